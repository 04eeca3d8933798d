"""Image ViT -> VideoMamba (`mappings/vit-videomamba-mlp.yaml`): the mapping on every pair it lists, a conversion of
the shipped teacher end to end, the patch kernel's inflation over time, out_proj halved for the summed scans, and the
measurement of `center` against `average` inflation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests._ckpt_factory import make_vit_state_dict, write_checkpoint
from tests._students import REPO, TEACHER, layer_cosines, teacher_and_images
from tmconvert.converter.cli import main
from tmconvert.converter.convert.engine import ConversionResult, ConvertRequest, convert
from tmconvert.converter.lint.mappings import check_mapping, plan_for_names
from tmconvert.converter.mapping.files import default_mapping_for, load_mapping
from tmconvert.converter.mapping.ops import inflate_time
from tmconvert.converter.modelfile.classifier import load_model_file
from tmconvert.models import ViTConfig, build_model
from tmconvert.models import registry as registry_module
from tmconvert.models.registry import register
from tmconvert.models.videomamba import VideoMamba, VideoMambaConfig

MAPPING = REPO / "mappings" / "vit-videomamba-mlp.yaml"
TUBELET2 = "videomamba-test-t2"  # 192 wide like the teacher, tubelet 2 over 4 frames


@pytest.fixture
def tubelet_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    register(TUBELET2, VideoMambaConfig(embed_dim=192, depth=24, tubelet=2, num_frames=4))


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> ConversionResult:
    out = tmp_path_factory.mktemp("videomamba") / "vm.safetensors"
    request = ConvertRequest(
        source=TEACHER,
        target="videomamba-ti",
        out=out,
        calib="fashion-mnist[:16]",
        score="magnitude",
        format="upstream",
    )
    return convert(request)


def _with_mode(tmp_path: Path, mode: str) -> Path:
    path = tmp_path / f"vm-{mode}.yaml"
    text = MAPPING.read_text().replace('default_for: [videomamba-ti, videomamba-s, videomamba-m, "*"]', "")
    path.write_text(text.replace("mode: center", f"mode: {mode}"))
    return path


def test_mapping_checks_on_every_pair_it_supports() -> None:
    loaded = load_mapping(MAPPING)
    pairs, problems = check_mapping(loaded)
    assert problems == []
    assert pairs == [tuple(pair) for pair in loaded.mapping.supports] and len(pairs) == 11
    assert {default_mapping_for(name).name for name in ("videomamba-ti", "videomamba-s", "videomamba-m")} == {
        MAPPING.name
    }


def test_shipped_teacher_converts_and_reloads_strict(converted: ConversionResult) -> None:
    cfg = converted.plan.target.config
    assert (cfg.img_size, cfg.patch_size, cfg.num_classes, cfg.tubelet, cfg.num_frames) == ((28, 28), 4, 10, 1, 8)
    assert converted.verification["strict_load"] is True
    assert converted.verification["pth_keys"] == converted.verification["keys"] == 416
    report = converted.verify_report
    assert report.ok and report.teacher_comparison == "done", report.problems
    assert [(s.layer, s.block) for s in report.layers[:12]] == [(j, j) for j in range(12)]  # which block fed it
    assert all(s.block is None for s in report.layers[12:])
    upstream = torch.load(converted.paths.pth, map_location="cpu", weights_only=True)
    VideoMamba(cfg, device="meta").load_state_dict(upstream["model"], strict=True, assign=True)  # upstream's loader
    student = load_model_file(converted.paths.weights).model
    assert student(torch.randn(2, 3, 8, 28, 28)).shape == (2, 10)  # an 8-frame clip runs


def test_converted_layers_stay_close_to_the_teacher_where_a_scratch_student_does_not(
    converted: ConversionResult,
) -> None:
    teacher, images = teacher_and_images()
    student = load_model_file(converted.paths.weights).model
    scratch = build_model(converted.plan.target.config, seed=0)
    ours, theirs = layer_cosines(student, teacher, images, 12), layer_cosines(scratch, teacher, images, 12)
    assert min(ours[:3]) > 0.6 and min(ours) > 0.5, ours  # measured 0.80, 0.72, 0.71 ... 0.59 (scratch: 0.06)
    assert all(o > t + 0.4 for o, t in zip(ours[:3], theirs[:3], strict=True)), (ours, theirs)


@pytest.mark.parametrize("mode", ["center", "average"])
@pytest.mark.parametrize("frames", [1, 2, 3])
def test_inflated_kernel_embeds_identical_frames_as_the_image(mode: str, frames: int) -> None:
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(8, 3, 4, 4, generator=gen).double(), torch.randn(8, generator=gen).double()
    image = torch.randn(2, 3, 12, 12, generator=gen).double()
    clip = image.unsqueeze(2).expand(-1, -1, frames, -1, -1)
    inflated = inflate_time(weight, frames=frames, mode=mode)
    assert inflated.shape == (8, 3, frames, 4, 4)
    video = F.conv3d(clip, inflated, bias, stride=(frames, 4, 4))[:, :, 0]
    torch.testing.assert_close(video, F.conv2d(image, weight, bias, stride=4), rtol=0, atol=1e-12)
    if frames > 1:  # the modes differ on frames that differ
        moving = torch.stack([torch.roll(image, f, dims=-1) for f in range(frames)], dim=2)
        others = inflate_time(weight, frames=frames, mode="average" if mode == "center" else "center")
        assert not torch.allclose(F.conv3d(moving, inflated, bias), F.conv3d(moving, others, bias))


@pytest.mark.parametrize("mode", ["center", "average"])
def test_converted_tubelet_student_embeds_a_still_clip_as_the_teacher(tmp_path, tubelet_target, mode) -> None:
    out = tmp_path / "t2.safetensors"
    convert(ConvertRequest(source=TEACHER, target=TUBELET2, mapping=str(_with_mode(tmp_path, mode)), out=out))
    student = load_model_file(out).model.eval()
    teacher, images = teacher_and_images(4)
    clip = images.unsqueeze(2).expand(-1, -1, 4, -1, -1)  # 4 identical frames: 2 time steps
    with torch.no_grad():
        embedded, wanted = student._embed(clip), teacher._embed(images)
    for step in student.frame_patch_indices(4):
        torch.testing.assert_close(embedded[:, step], wanted[:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(embedded[:, 0], wanted[:, 0])  # cls and its position, at 0 in both


def _step_cosine(tokens: torch.Tensor, steps: torch.Tensor, wanted: list[torch.Tensor]) -> float:
    """Mean cosine of each time step's patch tokens to the teacher tokens wanted for that step."""
    pairs = zip(steps, wanted, strict=True)
    return (
        torch.stack([F.cosine_similarity(tokens[:, i].double(), w.double(), dim=-1).mean() for i, w in pairs])
        .mean()
        .item()
    )


def test_center_and_average_inflation_measured_on_still_and_moving_clips(tmp_path, tubelet_target) -> None:
    """Stage-1 cosine of each time step's patch tokens to the per-frame teacher at layer 0, on clips of 4 frames
    each shifted `shift` px further: identical frames cannot tell the modes apart; on moving frames each mode is
    closer to the reference it was made for, `center` to the teacher on the tubelet's middle frame and `average` to
    the teacher's mean over the tubelet (layer 0 and 11 values in mappings/vit-videomamba-mlp.yaml)."""
    teacher, images = teacher_and_images(8)
    measured: dict[tuple[str, int, str], float] = {}
    for mode in ("center", "average"):
        out = tmp_path / f"{mode}.safetensors"
        mapping = str(_with_mode(tmp_path, mode))
        convert(ConvertRequest(source=TEACHER, target=TUBELET2, mapping=mapping, out=out, verify=False))
        student = load_model_file(out).model.eval()
        for shift in (0, 2):
            clip = torch.stack([torch.roll(images, f * shift, dims=-1) for f in range(4)], dim=2)
            with torch.no_grad():
                tokens = student.forward_all(clip).layer_tokens[0]
                frames = [teacher.forward_all(clip[:, :, f]).layer_tokens[0][:, 1:] for f in range(4)]
            steps = student.frame_patch_indices(4)  # time step t covers frames 2t, 2t + 1
            middle = [frames[2 * t + 1] for t in range(2)]  # center mode's frame (frames // 2 of the tubelet)
            mean = [(frames[2 * t] + frames[2 * t + 1]) / 2 for t in range(2)]
            measured[(mode, shift, "middle")] = _step_cosine(tokens, steps, middle)
            measured[(mode, shift, "mean")] = _step_cosine(tokens, steps, mean)
    for reference in ("middle", "mean"):
        assert measured[("center", 0, reference)] == pytest.approx(measured[("average", 0, reference)], abs=1e-6)
    assert measured[("center", 2, "middle")] > measured[("average", 2, "middle")] + 0.02, measured
    assert measured[("average", 2, "mean")] > measured[("center", 2, "mean")] + 0.02, measured


def test_out_proj_halved_makes_the_summed_layer_the_vim_layer(tmp_path: Path) -> None:
    """VideoMamba sums its two scans where ViM averages them: with the same SSM core, the converted VideoMamba
    layer computes exactly what the converted ViM layer does (and would double its mixer output without the 1/2)."""
    files = {}
    for target in ("vim-t", "videomamba-ti"):
        files[target] = tmp_path / f"{target}.safetensors"
        convert(ConvertRequest(source=TEACHER, target=target, out=files[target], layers=1, verify=False))
    vim = load_model_file(files["vim-t"]).model.eval()
    video = load_model_file(files["videomamba-ti"]).model.eval()
    vim_layer, video_layer = vim.layers[0], video.layers[0]
    mapped = {"norm.weight", "mixer.in_proj.weight", "mixer.out_proj.weight"}
    for name in mapped:  # the mapped tensors agree but for the 1/2
        factor = 0.5 if name == "mixer.out_proj.weight" else 1.0
        torch.testing.assert_close(video_layer.state_dict()[name], factor * vim_layer.state_dict()[name])
    core = {k: v for k, v in vim_layer.state_dict().items() if k not in mapped}
    video_layer.load_state_dict(core, strict=False)  # the same SSM core in both
    hidden = torch.randn(2, 50, 192, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed_vim, _ = vim_layer(hidden)
        mixed_video, _ = video_layer(hidden)
    torch.testing.assert_close(mixed_video, mixed_vim, rtol=1e-5, atol=1e-5)


def test_deit_s_shaped_teacher_subclones_into_videomamba_ti(tmp_path: Path) -> None:
    cfg = ViTConfig(embed_dim=384, depth=12, num_heads=6, mlp_hidden=1536, patch_size=16, img_size=(64, 64))
    state = make_vit_state_dict(cfg, seed=3)
    src = write_checkpoint(state, tmp_path / "deit-s.safetensors")
    result = convert(ConvertRequest(source=src, target="videomamba-ti", out=tmp_path / "vm.safetensors", calib="4"))
    assert result.verify_report.ok and result.verification["strict_load"]
    residual, hidden = result.selection["residual"][None], result.selection["hidden"][0]
    assert len(residual) == 192 and len(hidden) == 384
    student = load_model_file(result.paths.weights).model.state_dict()
    kernel = state["patch_embed.proj.weight"][residual].unsqueeze(2)  # tubelet 1: center and average are the kernel
    torch.testing.assert_close(student["patch_embed.proj.weight"], kernel)
    fc2 = state["blocks.0.mlp.fc2.weight"][residual][:, hidden] * (1536 / 384) ** 0.5 / 2
    torch.testing.assert_close(student["layers.0.mixer.out_proj.weight"], fc2)
    torch.testing.assert_close(student["pos_embed"], state["pos_embed"][..., residual])
    assert not student["temporal_pos_embedding"].any()


def test_a_wider_student_and_a_pooling_teacher_are_refused_naming_the_yaml_path(tmp_path, capsys) -> None:
    out = str(tmp_path / "o.safetensors")
    assert main([str(TEACHER), "--to", "videomamba-s", "--out", out]) == 1
    err = capsys.readouterr().err
    assert f"{MAPPING}:" in err and "index_sets.residual: keeps 384 (target.embed_dim) of 192" in err, err
    problems = plan_for_names(load_mapping(MAPPING), "vit-b-gap", "videomamba-s").problems
    assert problems[0].path == "requires.source.class_token", problems  # first, before what follows from it
    assert "accepts only sources with class_token = True" in problems[0].message
