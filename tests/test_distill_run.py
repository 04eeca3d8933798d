"""CPU distillation runs on a tiny teacher/student: the loss goes down, the output is a converter-format ViM without
projectors, resume reproduces an uninterrupted run, and bad inputs fail before anything is written."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from tests._distill_factory import (
    STUDENT_CFG,
    TEACHER,
    convert_student,
    recipe,
    registered_student,
    request,
    state_of,
    write_image_folder,
    write_teacher,
)
from tmconvert.converter.cli import main
from tmconvert.converter.distill.errors import RecipeError, RunError
from tmconvert.converter.distill.recipe import Recipe, load_recipe
from tmconvert.converter.distill.run import even_pairs, plan_pairs, prepare_run, run_distillation
from tmconvert.converter.modelfile.classifier import load_classifier
from tmconvert.converter.modelfile.converted import read_metadata
from tmconvert.models.vim import VisionMamba
from tmconvert.models.vit import ViTConfig

SHORT = ["optim.warmup_fraction=0", "data.augment=none", "data.hflip=false"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("distill")
    teacher = write_teacher(folder / "teacher.safetensors")
    return teacher, convert_student(teacher, folder / "student.safetensors")


def _run(teacher, student, tmp_path, out="run", data="synthetic:16", overrides=(), **kw):
    flags = {k: kw.pop(k) for k in ("steps", "batch_size", "seed") if k in kw}
    loaded = recipe(tmp_path, [*SHORT, *overrides], **flags)
    return run_distillation(prepare_run(request(teacher, student, data, tmp_path / out, loaded, **kw)))


def _losses(metrics: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in metrics.read_text().splitlines() if '"loss"' in line]


def test_a_few_cpu_steps_lower_the_loss(files, tmp_path):
    teacher, student = files
    result = _run(teacher, student, tmp_path, steps=10, batch_size=16, overrides=["optim.lr=3e-3"])
    losses = _losses(result.paths.metrics)
    assert result.finished and len(losses) == 10
    assert losses[-1] < losses[0] - 0.2 and all(b < a for a, b in itertools.pairwise(losses))
    records = [json.loads(line) for line in result.paths.metrics.read_text().splitlines()[:10]]
    assert records[-1]["feature"] < 0.8 * records[0]["feature"]  # cosine alignment rises from ~0 to ~0.25
    record = records[0]
    assert set(record["similarities"]) == {"fwd", "bwd"} and len(record["weights"]["fwd"]) == 2
    assert {"task", "kd", "feature", "images_per_second", "lr"} <= set(record)


def test_output_is_a_converter_format_vim_without_projectors(files, tmp_path):
    teacher, student = files
    result = _run(teacher, student, tmp_path, steps=2, batch_size=8, overrides=["loss.projector=mlp"])
    with safe_open(str(result.paths.student), framework="pt") as handle:
        keys = list(handle.keys())
    converted_keys = list(state_of(student))
    assert sorted(keys) == sorted(converted_keys) == sorted(VisionMamba(STUDENT_CFG, device="meta").state_dict())
    assert not any("projector" in k or k.startswith("loss.") for k in keys)
    checkpoint = torch.load(result.paths.checkpoint, weights_only=True)
    assert any(k.startswith("alignment.projectors.") for k in checkpoint["projectors"])  # kept for --resume only
    meta, converted_meta = read_metadata(result.paths.student), read_metadata(student)
    assert meta["layer_plan"] == converted_meta["layer_plan"] and meta["index_sets"] == converted_meta["index_sets"]
    assert meta["distill"]["steps"] == 2 and meta["distill"]["pairs"] == [[0, 0], [1, 1]]
    assert meta["input"]["mean"] == [0.485, 0.456, 0.406]
    loaded = load_classifier(result.paths.student)
    assert loaded.family == "vim" and loaded.config.num_classes == 10
    torch.testing.assert_close(dict(loaded.model.state_dict()), dict(checkpoint["student"]))
    assert json.loads(result.paths.sidecar.read_text())["distill"]["fingerprint"] == result.fingerprint
    run = json.loads(result.paths.run.read_text())
    saved_recipe = Recipe.model_validate(yaml.safe_load(result.paths.recipe.read_text()))
    assert run["pairs"] == [[0, 0], [1, 1]] and saved_recipe.optim.warmup_fraction == 0.0


def test_resume_after_a_stop_ends_where_a_straight_run_ends(files, tmp_path):
    teacher, student = files
    kw = {
        "steps": 6,
        "batch_size": 4,
        "data": "synthetic:12",
        "overrides": ["data.augment=pad_crop", "data.hflip=true"],
    }
    straight = _run(teacher, student, tmp_path, out="straight", **kw)
    first = _run(teacher, student, tmp_path, out="split", stop_after=3, **kw)
    assert not first.finished and first.step == 3 and not first.paths.student.exists()
    second = _run(teacher, student, tmp_path, out="split", resume=True, **kw)
    assert second.finished and second.step == 6
    a, b = state_of(straight.paths.student), state_of(second.paths.student)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    assert _losses(straight.paths.metrics) == pytest.approx(_losses(second.paths.metrics), abs=1e-6)


def test_resume_refuses_another_runs_checkpoint_and_overwrites_nothing(files, tmp_path):
    teacher, student = files
    done = _run(teacher, student, tmp_path, steps=2, batch_size=8)
    before = {p: p.read_bytes() for p in done.paths.all()}
    with pytest.raises(RunError, match=r"belongs to another run .*differs in: recipe"):
        _run(teacher, student, tmp_path, steps=3, batch_size=8, resume=True)
    with pytest.raises(RunError, match="holds a run"):
        _run(teacher, student, tmp_path, steps=2, batch_size=8)
    with pytest.raises(RunError, match="differs in: data"):
        _run(teacher, student, tmp_path, steps=2, batch_size=8, data="synthetic:24", resume=True)
    assert {p: p.read_bytes() for p in done.paths.all()} == before
    with pytest.raises(RunError, match="no checkpoint to continue"):
        _run(teacher, student, tmp_path, out="fresh", steps=2, batch_size=8, resume=True)


def test_from_scratch_student_adapts_to_the_teacher(files, tmp_path):
    teacher, _ = files
    with registered_student() as name:
        result = _run(teacher, name, tmp_path, steps=1, batch_size=8)
    loaded = load_classifier(result.paths.student)
    cfg = loaded.config
    assert (cfg.img_size, cfg.patch_size, cfg.num_classes, cfg.embed_dim) == ((16, 16), 4, 10, 16)
    meta = read_metadata(result.paths.student)
    assert meta["target"] == name and meta["distill"]["pairs"] == [[0, 0], [1, 1]]
    assert even_pairs(24, 12) == [(2 * k + 1, k) for k in range(12)]
    assert even_pairs(4, 12) == [(0, 2), (1, 5), (2, 8), (3, 11)]


def test_interleaved_plans_pair_the_layers_that_end_a_block() -> None:
    """Feature alignment compares with block outputs: a layer that took a block's attention ends mid-block."""
    plan = [{"layer": 0, "block": 0, "sublayer": "attn"}, {"layer": 1, "block": 0, "sublayer": "mlp"}]
    plan += [{"layer": 2, "block": 1}, {"layer": 3, "block": None}]
    assert plan_pairs({"layer_plan": plan}) == [(1, 0), (2, 1)]


def test_unlabelled_folder_turns_the_task_loss_off(files, tmp_path):
    teacher, student = files
    data = write_image_folder(tmp_path / "flat", {"": 8})
    result = _run(teacher, student, tmp_path, data=str(data), steps=1, batch_size=8)
    record = json.loads(result.paths.metrics.read_text().splitlines()[0])
    assert "task" not in record and "kd" in record
    assert result.notes == ["unlabelled data: the task loss is off"]


def test_bad_inputs_are_clear_errors_before_any_write(files, tmp_path):
    teacher, student = files
    cases = [
        ({"overrides": ["loss.pairs=[[5, 0]]"]}, RunError, "student layer 5; the student has 0..1"),
        ({"overrides": ["loss.pairs=[[0, 7]]"]}, RunError, "teacher block 7; the teacher has 0..1"),
        ({"overrides": ["loss.pairs=[[0, 0], [0, 1]]"]}, RunError, "paired twice"),
        ({"data": str(tmp_path / "nowhere")}, Exception, "no such data folder"),
        ({"batch_size": 64}, Exception, "do not make one batch"),
        ({"overrides": ["loss.task=0", "loss.kd=0", "loss.feature=0"]}, RunError, "every loss weight is 0"),
    ]
    for kw, exc, message in cases:
        with pytest.raises(exc, match=message):
            _run(teacher, student, tmp_path, steps=1, **{"batch_size": 8, **kw})
    shallow = write_teacher(tmp_path / "shallow.safetensors", ViTConfig(**{**TEACHER.__dict__, "depth": 1}))
    with pytest.raises(RunError, match="layer plan: pair 1:1 names teacher block 1"):
        _run(shallow, student, tmp_path, steps=1, batch_size=8)
    other_classes = write_teacher(tmp_path / "c5.safetensors", ViTConfig(**{**TEACHER.__dict__, "num_classes": 5}))
    with pytest.raises(RunError, match="logit KD needs the same classes"):
        _run(other_classes, student, tmp_path, steps=1, batch_size=8)
    other_size = write_teacher(tmp_path / "s32.safetensors", ViTConfig(**{**TEACHER.__dict__, "img_size": (32, 32)}))
    with pytest.raises(RunError, match="differs from the teacher's 32x32x3"):
        _run(other_size, student, tmp_path, steps=1, batch_size=8)
    with pytest.raises(RunError, match="neither a file nor a known model name"):
        _run(teacher, "vim-nonexistent", tmp_path, steps=1, batch_size=8)
    assert not (tmp_path / "run").exists()


def test_recipe_validation_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("recipe: 1\nsteps: 10\noptim:\n  lr: -1\n  lrr: 2\n")
    with pytest.raises(RecipeError, match=r"r\.yaml:4: optim\.lr: Input should be greater than 0.*optim\.lrr"):
        load_recipe(str(path))
    path.write_text("recipe: 1\n")
    loaded = load_recipe(str(path), ["optim.lr=1e-3", "loss.pairs=[[1, 0]]", "loss.adaptive=false"], {"steps": 7})
    recipe_ = loaded.recipe
    assert (recipe_.optim.lr, recipe_.loss.pairs, recipe_.loss.adaptive, recipe_.steps) == (1e-3, [(1, 0)], False, 7)
    with pytest.raises(RecipeError, match=r"--set optim\.lr=abc: optim\.lr"):
        load_recipe(str(path), ["optim.lr=abc"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(str(path), ["optim.lr"])
    with pytest.raises(RecipeError, match=r"--steps 0: steps"):
        load_recipe(str(path), [], {"steps": 0})
    with pytest.raises(RecipeError, match="unknown recipe"):
        load_recipe("no-such-recipe")


def test_shipped_default_recipe_is_the_schema_default():
    loaded = load_recipe()
    assert Path(loaded.source).name == "default.yaml"
    assert loaded.recipe.model_dump(exclude={"name"}) == Recipe().model_dump(exclude={"name"})


def test_cli_distill_and_errors(files, tmp_path, capsys):
    teacher, student = files
    (tmp_path / "r.yaml").write_text("recipe: 1\ndata:\n  workers: 0\n")
    base = [
        "distill",
        str(teacher),
        str(student),
        "--data",
        "synthetic:8",
        "--recipe",
        str(tmp_path / "r.yaml"),
        "--heads",
        "2",
        "--batch-size",
        "4",
        "--device",
        "cpu",
    ]
    code = main(
        [*base, "--out", str(tmp_path / "cli"), "--steps", "2", "--pairs", "1:1", "--json", "--set", "run.log_every=1"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["finished"] and report["step"] == 2 and Path(report["student"]).is_file()
    assert json.loads((tmp_path / "cli" / "run.json").read_text())["pairs"] == [[1, 1]]
    assert main([*base, "--out", str(tmp_path / "cli"), "--steps", "2"]) == 1
    assert "holds a run" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "cli2"), "--pairs", "0-0"]) == 1
    assert "--pairs 0-0: expected" in capsys.readouterr().err
