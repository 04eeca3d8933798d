"""The layer-wise alignment phase (`align.steps`) on a tiny converted student, on the CPU: it lowers its loss, reads
the layer plan's block / attn / mlp pairings, trains only the aligned layers, resumes exactly (in the phase and
after it), refuses students it cannot align in one line, and two gloo ranks align like one process."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests._distill_factory import (
    STUDENT_CFG,
    TEACHER,
    convert_student,
    recipe,
    registered_student,
    request,
    state_of,
    write_teacher,
)
from tmconvert.converter.cli import main
from tmconvert.converter.distill.align import (
    AlignmentPlan,
    LayerAlignment,
    LayerPairing,
    layer_pairings,
    relative_update_error,
    teacher_streams,
)
from tmconvert.converter.distill.errors import RecipeError, RunError
from tmconvert.converter.distill.loss import token_alignment
from tmconvert.converter.distill.recipe import Recipe
from tmconvert.converter.distill.run import prepare_run, run_distillation
from tmconvert.converter.modelfile.converted import (
    OutputPaths,
    encode_metadata,
    load_converted,
    read_metadata,
    write_model_file,
)
from tmconvert.converter.modelfile.safetensors import TensorSpec
from tmconvert.models.vim import VisionMamba
from tmconvert.models.vit import VisionTransformer

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["optim.warmup_fraction=0", "data.augment=none", "data.hflip=false"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("align")
    teacher = write_teacher(folder / "teacher.safetensors")
    return teacher, convert_student(teacher, folder / "student.safetensors")


def _with_metadata(student: Path, out: Path, **changes: Any) -> Path:
    """A copy of a converted student with some metadata entries replaced (what another converter would write)."""
    _, state, metadata = load_converted(student)
    assert all(t.dtype == torch.float32 for t in state.values())
    specs = [TensorSpec(name, tuple(t.shape), "float32") for name, t in state.items()]
    paths = OutputPaths.for_weights(out)
    write_model_file(paths, specs, iter(state.items()), encode_metadata({**metadata, **changes}), overwrite=True)
    return out


def _run(teacher, student, tmp_path, out="run", data="synthetic:16", overrides=(), **kw):
    flags = {k: kw.pop(k) for k in ("steps", "batch_size", "seed") if k in kw}
    loaded = recipe(tmp_path, [*SHORT, *overrides], **flags)
    return run_distillation(prepare_run(request(teacher, student, data, tmp_path / out, loaded, **kw)))


def _records(metrics: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def test_alignment_lowers_its_loss_and_is_recorded(files, tmp_path):
    teacher, student = files
    result = _run(teacher, student, tmp_path, steps=2, batch_size=8, overrides=["align.steps=20", "align.lr=3e-3"])
    assert result.finished and result.step == result.total == 22
    records = _records(result.paths.metrics)
    aligning = [r for r in records if r.get("phase") == "align"]
    assert [r["step"] for r in aligning] == list(range(1, 21))
    assert [r["step"] for r in records if "phase" not in r] == [21, 22, 22]  # distillation, then "done"
    assert {"task", "kd", "feature"} <= set(records[20])  # distillation lines as without alignment
    first, final = aligning[0], aligning[-1]
    assert set(first) >= {"lr", "loss", "layers", "layer_loss", "update_cosine", "output_cosine", "grad_norm"}
    assert first["layers"] == [0, 1] and len(first["update_cosine"]) == len(first["output_cosine"]) == 2
    # the converted layers start far from their blocks' updates (relative error ~1) and move clearly towards them
    assert first["loss"] > 0.9 and final["loss"] < 0.7 * first["loss"]
    assert all(b > a + 0.2 for a, b in zip(first["update_cosine"], final["update_cosine"], strict=True))
    assert first["loss"] == pytest.approx(sum(first["layer_loss"]) / 2, abs=1e-4)
    summary = result.align
    assert summary["steps"] == 20 and summary["first"]["loss"] == first["loss"]
    assert summary["final"]["update_cosine"] == final["update_cosine"]
    assert summary["pairs"] == [
        {"layer": 0, "block": 0, "sublayer": "block"},
        {"layer": 1, "block": 1, "sublayer": "block"},
    ]
    run = json.loads(result.paths.run.read_text())
    assert (run["steps"], run["align_steps"], run["align"]) == (2, 20, summary)
    assert run["align_pairs"] == summary["pairs"]
    distill = read_metadata(result.paths.student)["distill"]
    assert distill["steps"] == 2 and distill["align"] == summary and distill["recipe"]["align"]["steps"] == 20


def test_pairing_reads_sublayers_and_streams_match_the_teacher():
    metadata = {
        "layer_plan": [
            {"layer": 0, "block": 0, "sublayer": "attn"},
            {"layer": 1, "block": 0, "sublayer": "mlp"},
            {"layer": 2, "block": 1},  # written before sublayers existed: the whole block
            {"layer": 3, "block": None},  # not inherited: not aligned
            {"layer": 4, "block": 1, "sublayer": "block"},
        ]
    }
    pairings = layer_pairings(metadata)
    assert pairings == [LayerPairing(0, 0, "attn"), LayerPairing(1, 0, "mlp"), LayerPairing(2, 1), LayerPairing(4, 1)]
    assert [p.sublayer for p in pairings] == ["attn", "mlp", "block", "block"]
    assert layer_pairings({}) == [] and layer_pairings({"layer_plan": [{"layer": 0, "block": None}]}) == []
    with pytest.raises(RunError, match="layer 0: sublayer 'ffn' is not one of block, attn, mlp"):
        layer_pairings({"layer_plan": [{"layer": 0, "block": 0, "sublayer": "ffn"}]})

    teacher = VisionTransformer(TEACHER, seed=0).eval()
    with torch.no_grad():
        out = teacher.forward_all(torch.randn(2, 3, 16, 16))
        torch.testing.assert_close(teacher.blocks[0](out.embed_tokens)[0], out.layer_tokens[0])
    streams = [teacher_streams(out, p) for p in pairings]
    expected = [
        (out.embed_tokens, out.mid_tokens[0]),
        (out.mid_tokens[0], out.layer_tokens[0]),
        (out.layer_tokens[0], out.layer_tokens[1]),
        (out.layer_tokens[0], out.layer_tokens[1]),
    ]
    for (source, target), (want_source, want_target) in zip(streams, expected, strict=True):
        assert source is want_source and target is want_target

    # into the student's view: teacher cls (position 0) in ViM's middle, patches in raster order, kept channels
    student = VisionMamba(dataclasses.replace(STUDENT_CFG, img_size=(16, 16), patch_size=4), seed=0)
    index, valid = token_alignment(student.token_layout(), TEACHER.token_layout())
    channels = list(range(0, 32, 2))
    module = LayerAlignment(student, AlignmentPlan(pairings[:2], channels, index, valid))
    view = module.student_view(out.embed_tokens)
    middle = student.cfg.cls_index
    assert view.shape == (2, 17, 16) and middle == 8
    torch.testing.assert_close(view[:, middle], out.embed_tokens[:, 0, ::2])
    torch.testing.assert_close(view[:, :middle], out.embed_tokens[:, 1:9, ::2])
    torch.testing.assert_close(view[:, middle + 1 :], out.embed_tokens[:, 9:, ::2])


def test_loss_is_the_relative_error_of_updates_and_skips_unpaired_tokens():
    teacher_update = torch.randn(3, 5, 4)
    assert relative_update_error(torch.zeros_like(teacher_update), teacher_update).item() == pytest.approx(1.0)
    assert relative_update_error(teacher_update, teacher_update).item() == 0.0
    assert relative_update_error(3 * teacher_update, teacher_update).item() == pytest.approx(4.0)
    valid = torch.tensor([True, True, False, True, True])
    off_at_two = teacher_update.clone()
    off_at_two[:, 2] += 100.0  # a token the teacher does not have: not compared
    assert relative_update_error(off_at_two, teacher_update, valid).item() == 0.0
    # an average-pooled teacher has no cls: the student's middle cls reads zero and is left out of the loss
    gap = dataclasses.replace(TEACHER, class_token=False, global_pool="avg")
    student = VisionMamba(dataclasses.replace(STUDENT_CFG, img_size=(16, 16), patch_size=4), seed=0)
    index, valid = token_alignment(student.token_layout(), gap.token_layout())
    module = LayerAlignment(student, AlignmentPlan([LayerPairing(0, 0)], None, index, valid))
    tokens = torch.randn(2, 16, 16)
    view = module.student_view(tokens)
    assert view[:, 8].abs().sum() == 0 and torch.equal(view[:, 9:], tokens[:, 8:])


def test_only_the_aligned_layers_train(files, tmp_path):
    teacher, student = files
    plan = [{"layer": 0, "block": 1, "sublayer": "attn"}, {"layer": 1, "block": None}]
    one_layer = _with_metadata(student, tmp_path / "one.safetensors", layer_plan=plan)
    result = _run(teacher, one_layer, tmp_path, steps=1, batch_size=8, overrides=["align.steps=3"], stop_after=3)
    assert not result.finished and result.step == 3
    assert result.align is None  # stopped at the phase's last step, before its summary
    checkpoint = torch.load(result.paths.checkpoint, weights_only=True)
    assert checkpoint["phase"] == "align" and checkpoint["step"] == 3
    before, after = state_of(one_layer), checkpoint["student"]
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {name for name in before if name.startswith("layers.0.")}
    assert _records(result.paths.metrics)[0]["layers"] == [0]


def test_resume_in_and_after_the_phase_ends_where_a_straight_run_ends(files, tmp_path):
    teacher, student = files
    kw = {
        "steps": 3,
        "batch_size": 4,
        "data": "synthetic:12",
        "overrides": ["data.augment=pad_crop", "data.hflip=true", "align.steps=6", "align.warmup_fraction=0.3"],
    }
    straight = _run(teacher, student, tmp_path, out="straight", **kw)
    expected = state_of(straight.paths.student)
    for stop in (3, 7):  # in the alignment phase, then in distillation after it
        first = _run(teacher, student, tmp_path, out=f"split{stop}", stop_after=stop, **kw)
        checkpoint = torch.load(first.paths.checkpoint, weights_only=True)
        assert not first.finished and checkpoint["step"] == stop
        assert checkpoint.get("phase", "distill") == ("align" if stop <= 6 else "distill")
        second = _run(teacher, student, tmp_path, out=f"split{stop}", resume=True, **kw)
        assert second.finished and second.step == 9 and second.align == straight.align
        got = state_of(second.paths.student)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)
        resumed, uninterrupted = _records(second.paths.metrics), _records(straight.paths.metrics)
        assert [(r.get("phase"), r["step"]) for r in resumed] == [(r.get("phase"), r["step"]) for r in uninterrupted]
        losses = [r["loss"] for r in uninterrupted if "loss" in r]
        assert [r["loss"] for r in resumed if "loss" in r] == pytest.approx(losses, abs=1e-6)
        assert read_metadata(second.paths.student)["distill"] == read_metadata(straight.paths.student)["distill"]


def test_students_that_cannot_be_aligned_fail_in_one_line_before_any_write(files, tmp_path, capsys):
    teacher, student = files
    with registered_student() as name:
        with pytest.raises(RunError, match=rf"^align\.steps=5: the student {name} has no layer plan .*align\.steps=0$"):
            _run(teacher, name, tmp_path, steps=1, batch_size=8, overrides=["align.steps=5"])
        _run(teacher, name, tmp_path, out="scratch", steps=1, batch_size=8)  # align.steps 0: trains as before
    metadata = read_metadata(student)
    no_channels = {k: v for k, v in metadata["index_sets"].items() if k != "residual"}
    narrow = _with_metadata(student, tmp_path / "narrow.safetensors", index_sets=no_channels)
    with pytest.raises(RunError, match=r"align\.steps=5: the student's residual width 16 differs from the teacher's"):
        _run(teacher, narrow, tmp_path, steps=1, batch_size=8, overrides=["align.steps=5"])
    bad_plan = [{"layer": 0, "block": 5}]
    beyond = _with_metadata(student, tmp_path / "beyond.safetensors", layer_plan=bad_plan)
    with pytest.raises(RunError, match=r"pairs layer 0 with teacher block 5; the teacher has blocks 0\.\.1"):
        _run(teacher, beyond, tmp_path, steps=1, batch_size=8, overrides=["align.steps=5", "loss.pairs=even"])
    assert not (tmp_path / "run").exists()
    with registered_student() as name:
        args = ["distill", str(teacher), name, "--data", "synthetic:8", "--out", str(tmp_path / "cli")]
        code = main([*args, "--heads", "2", "--batch-size", "8", "--steps", "1", "--set", "align.steps=5"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: align.steps=5: the student vim-test-distill")
    assert not (tmp_path / "cli").exists()


def test_recipe_section_and_cli_progress(files, tmp_path, capsys):
    off, on = Recipe(), Recipe.model_validate({"align": {"steps": 4}})
    assert "align" not in off.to_json() and "align" not in off.fingerprint_view()  # runs without it: as before
    assert on.to_json()["align"] == {
        "steps": 4,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "warmup_fraction": 0.05,
        "min_lr": 1e-6,
        "grad_clip": 1.0,
    }
    with pytest.raises(RecipeError, match=r"--set align\.steps=-1: align\.steps"):
        recipe(tmp_path, ["align.steps=-1"])
    teacher, student = files
    args = ["distill", str(teacher), str(student), "--data", "synthetic:8", "--out", str(tmp_path / "cli")]
    extra = ["--recipe", str(tmp_path / "recipe.yaml"), "--heads", "2", "--batch-size", "4", "--device", "cpu"]
    assert main([*args, *extra, "--steps", "2", "--set", "align.steps=2"]) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert [line.split(" loss ")[0] for line in lines] == ["align step 1/2", "align step 2/2", "step 1/2", "step 2/2"]
    assert "update cos" in lines[0] and "output cos" in lines[0]
    assert "aligned 2 layers in 2 steps: loss" in captured.out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_align_exactly_like_one_process(files, tmp_path):
    teacher, student = files
    overrides = ["optim.warmup_fraction=0", "align.steps=3"]
    loaded = recipe(tmp_path, overrides, steps=1, batch_size=8)
    single = run_distillation(prepare_run(request(teacher, student, "synthetic:16", tmp_path / "single", loaded)))
    args = ["distill", str(teacher), str(student), "--data", "synthetic:16", "--out", str(tmp_path / "ddp")]
    args += ["--recipe", str(tmp_path / "recipe.yaml"), "--heads", "2", "--device", "cpu", "--steps", "1"]
    args += ["--batch-size", "8", "--set", overrides[0], "--set", overrides[1]]
    code = f"import sys; from tmconvert.converter.cli import main; sys.exit(main({args!r}))"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**env, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["world"] == 2
    for name, value in run["align"]["final"].items():
        assert value == pytest.approx(single.align["final"][name], abs=1e-4)
    a, b = state_of(single.paths.student), state_of(tmp_path / "ddp" / "student.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)
