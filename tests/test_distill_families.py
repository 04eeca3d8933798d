"""Distillation and evaluation of the PlainMamba and VideoMamba students from an image ViT teacher: the feature
loss puts each teacher token at the scan step (PlainMamba's four zig-zags) or sequence position (VideoMamba's frames)
of its student token, and short CPU runs on images and clips write students that `tmconvert eval` reads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests._distill_factory import TEACHER, recipe, registered, request, write_teacher
from tmconvert.converter.cli import main
from tmconvert.converter.configs import derive_target_config
from tmconvert.converter.distill.errors import RunError
from tmconvert.converter.distill.families import TeacherTargets, student_scan_orders, student_token_alignment
from tmconvert.converter.distill.loss import FeatureAlignment
from tmconvert.converter.distill.run import prepare_run, run_distillation
from tmconvert.converter.modelfile.converted import read_metadata
from tmconvert.models import PlainMambaConfig, VideoMambaConfig, VisionTransformer, build_model

# tiny students of the 16 px / patch 4 teacher (4x4 grid + cls): stem_channels 24 is what the mapping's
# space-to-depth stem needs for 3 channels at patch 4
PLAIN = PlainMambaConfig(embed_dim=16, depth=2, d_state=4, num_convs=0, dwconv_layers=(), stem_channels=24)
VIDEO = VideoMambaConfig(embed_dim=16, depth=2, d_state=4, num_frames=4)
SHORT = ["optim.warmup_fraction=0", "data.augment=none", "data.hflip=false"]
ZIGZAG_4X4 = {  # raster index of the patch each PlainMamba direction visits at steps 0..15 on a 4x4 grid
    "row": [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11, 15, 14, 13, 12],
    "col": [0, 4, 8, 12, 13, 9, 5, 1, 2, 6, 10, 14, 15, 11, 7, 3],
}
ZIGZAG_4X4 |= {"row_rev": ZIGZAG_4X4["row"][::-1], "col_rev": ZIGZAG_4X4["col"][::-1]}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The tiny teacher and a PlainMamba and a VideoMamba converted from it by the real converter."""
    from tmconvert.converter.convert.engine import ConvertRequest, convert

    folder = tmp_path_factory.mktemp("families")
    teacher = write_teacher(folder / "teacher.safetensors")
    out = {"teacher": teacher}
    with registered(**{"plain-test": PLAIN, "video-test": VIDEO}):
        for name in ("plain-test", "video-test"):
            out[name] = folder / f"{name}.safetensors"
            convert(ConvertRequest(source=teacher, target=name, out=out[name], num_heads=TEACHER.num_heads))
    return out


def _alignment(student: torch.nn.Module, frames: int | None = None) -> FeatureAlignment:
    index, valid = student_token_alignment(student.cfg, TEACHER, frames)
    orders = student_scan_orders(student, frames)
    return FeatureAlignment([(0, 0)], orders, index, valid, student_width=32, teacher_width=32)


def _positions(alignment: FeatureAlignment, teacher_tokens: torch.Tensor, direction: str) -> list[float]:
    return alignment.teacher_in_scan_order(teacher_tokens[None, :, None], direction)[0, :, 0].tolist()


# ---------------------------------------------------------------------------------------------------------------
# Token placement


def test_plainmamba_loss_puts_teacher_token_j_at_its_zigzag_step():
    student = build_model(derive_target_config("plainmamba-l1", TEACHER), device="meta")
    assert student.cfg.grid == (4, 4) and student.cfg.patch_size == 4
    alignment = _alignment(student)
    assert alignment.directions == ["row", "row_rev", "col", "col_rev"] and not alignment._masked  # no cls to drop
    teacher_tokens = torch.arange(17.0)  # the value of teacher position j is j (cls at 0, patch p at 1 + p)
    orders = student.scan_orders()
    for name, path in ZIGZAG_4X4.items():
        assert orders[name].tolist() == path
        assert _positions(alignment, teacher_tokens, name) == [1.0 + p for p in path]


def test_videomamba_loss_puts_frame_t_patch_p_at_frame_patch_indices():
    student = _video(VIDEO)
    frames, tokens = 3, 17
    alignment = _alignment(student, frames)
    assert alignment.directions == ["fwd", "bwd"] and not alignment._masked  # the student's cls pairs too
    per_frame = torch.tensor([[100.0 * t + j for j in range(tokens)] for t in range(frames)])  # frame t, position j
    sequence = TeacherTargets(TEACHER).clip_sequence(per_frame[:, :, None], batch=1)[0, :, 0]
    assert sequence.shape == (frames * tokens + 1,)
    forward = _positions(alignment, sequence, "fwd")
    placed = student.frame_patch_indices(frames)
    assert placed.shape == (3, 16)
    for t in range(frames):
        for p in range(16):
            assert forward[int(placed[t, p])] == 100.0 * t + 1 + p
    assert forward[0] == 100.0  # the student's cls: the frames' mean teacher cls, (0 + 100 + 200) / 3
    assert _positions(alignment, sequence, "bwd") == forward[::-1]
    # a tubelet of 2 frames per time step pairs each time step with the mean of its frames
    tubelet = _video(VideoMambaConfig(embed_dim=16, depth=2, d_state=4, num_frames=4, tubelet=2))
    tubelet_alignment = _alignment(tubelet, 4)
    per_frame = torch.tensor([[100.0 * t + j for j in range(tokens)] for t in range(4)])
    sequence = TeacherTargets(TEACHER, tubelet=2).clip_sequence(per_frame[:, :, None], batch=1)[0, :, 0]
    forward = _positions(tubelet_alignment, sequence, "fwd")
    assert [forward[int(tubelet.frame_patch_indices(4)[s, 5])] for s in range(2)] == [56.0, 256.0]


def _video(cfg: VideoMambaConfig) -> torch.nn.Module:
    return build_model(cfg.for_teacher(img_size=(16, 16), patch_size=4, in_chans=3, num_classes=10, class_token=True))


def test_teacher_targets_on_clips_average_logits_and_keep_every_frames_tokens():
    teacher = VisionTransformer(TEACHER, seed=0).eval()
    clips = torch.randn(2, 3, 4, 16, 16)
    with torch.no_grad():
        logits, layers = TeacherTargets(TEACHER)(teacher, clips)
        frames = [teacher.forward_all(clips[:, :, t]) for t in range(4)]
    expected = torch.stack([f.logits for f in frames], dim=1).mean(dim=1)
    torch.testing.assert_close(logits, expected)
    assert len(layers) == TEACHER.depth and layers[1].shape == (2, 4 * 17 + 1, 32)
    torch.testing.assert_close(layers[1][:, 2 * 17 : 3 * 17], frames[2].layer_tokens[1])
    mean_cls = torch.stack([f.layer_tokens[1][:, 0] for f in frames]).mean(dim=0)
    torch.testing.assert_close(layers[1][:, -1], mean_cls)


# ---------------------------------------------------------------------------------------------------------------
# Runs


def _run(files, student: str, data: str, tmp_path: Path, out: str, overrides=()):
    loaded = recipe(tmp_path, [*SHORT, *overrides], steps=3, batch_size=8)
    prepared = prepare_run(request(files["teacher"], student, data, tmp_path / out, loaded))
    return prepared, run_distillation(prepared)


def _records(result) -> list[dict]:
    return [json.loads(line) for line in result.paths.metrics.read_text().splitlines() if '"loss"' in line]


def _eval(capsys, model: Path, data: str) -> dict:
    capsys.readouterr()
    assert main(["eval", str(model), "--data", data, "--device", "cpu", "--workers", "0", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("student", "data", "directions", "frames"),
    [
        ("plain-test", "synthetic:16", ["col", "col_rev", "row", "row_rev"], None),
        ("video-test", "clips:3:synthetic:16", ["bwd", "fwd"], 3),
        ("video-test", "synthetic:16", ["bwd", "fwd"], None),
    ],
)
def test_converted_students_distil_and_evaluate(files, tmp_path, capsys, student, data, directions, frames):
    prepared, result = _run(files, str(files[student]), data, tmp_path, "run")
    assert result.finished and result.step == 3
    assert prepared.pairs == [(0, 0), (1, 1)] and prepared.frames == frames  # the converted file's layer plan
    records = _records(result)
    assert len(records) == 3
    for record in records:
        assert all(math.isfinite(record[k]) for k in ("loss", "task", "kd", "feature"))
        assert sorted(record["similarities"]) == directions
        assert all(len(v) == 2 and all(math.isfinite(x) for x in v) for v in record["similarities"].values())
    assert 0.0 < records[-1]["feature"] < 1.5
    meta = read_metadata(result.paths.student)
    assert meta["family"] == read_metadata(files[student])["family"] and meta["distill"]["pairs"] == [[0, 0], [1, 1]]
    assert json.loads(result.paths.run.read_text())["frames"] == frames
    report = _eval(capsys, result.paths.student, data.replace(":16", ":24"))
    assert report["family"] == meta["family"] and report["images"] == 24
    assert 0.0 <= report["top1"] <= 1.0 and math.isfinite(report["loss"])


def test_from_scratch_students_pair_evenly(files, tmp_path):
    deep_plain = PlainMambaConfig(embed_dim=16, depth=4, d_state=4, num_convs=0, dwconv_layers=(), stem_channels=8)
    deep_video = VideoMambaConfig(embed_dim=16, depth=4, d_state=4, num_frames=2)
    with registered(**{"plain-scratch": deep_plain, "video-scratch": deep_video}):
        plain, plain_result = _run(files, "plain-scratch", "synthetic:16", tmp_path, "plain")
        video, video_result = _run(files, "video-scratch", "clips:2:synthetic:16", tmp_path, "video")
    for prepared, result in ((plain, plain_result), (video, video_result)):
        assert prepared.pairs == [(1, 0), (3, 1)]  # student layer 2k+1 <- teacher block k
        assert result.finished and all(math.isfinite(r["loss"]) for r in _records(result))
        assert read_metadata(result.paths.student)["distill"]["pairs"] == [[1, 0], [3, 1]]
    assert plain.student_config.img_size == (16, 16) and plain.student_config.grid == (4, 4)
    assert len(_records(plain_result)[0]["similarities"]) == 4 and len(_records(video_result)[0]["similarities"]) == 2


def test_students_that_cannot_read_the_data_are_refused(files, tmp_path):
    with pytest.raises(RunError, match=r"clips need a video student \(videomamba\), this one is a plainmamba"):
        _run(files, str(files["plain-test"]), "clips:2:synthetic:16", tmp_path, "a")
    tubelet = VideoMambaConfig(embed_dim=16, depth=2, d_state=4, num_frames=4, tubelet=2)
    with registered(**{"video-tubelet": tubelet}), pytest.raises(RunError, match="multiple of 2 frames, got 3"):
        _run(files, "video-tubelet", "clips:3:synthetic:16", tmp_path, "b")
    with pytest.raises(RunError, match=r"align.steps: .* ViM layers only, plain-test.safetensors is a plainmamba"):
        _run(files, str(files["plain-test"]), "synthetic:16", tmp_path, "c", ["align.steps=2"])
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c"))
