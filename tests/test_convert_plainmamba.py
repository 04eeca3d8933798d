"""Image ViT -> PlainMamba (`mappings/vit-plainmamba-mlp.yaml`): the mapping on every pair it lists, the geometry
rule, the stem built to hand over the teacher's patch embedding, a conversion of the shipped teacher end to end
(mmcls `.pth` included), subcloning from a DeiT-S-shaped teacher, and the one-line errors."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from tests._ckpt_factory import make_vit_state_dict, write_checkpoint
from tests._students import REPO, TEACHER, layer_cosines, teacher_and_images
from tmconvert.converter.checkpoint import open_checkpoint
from tmconvert.converter.cli import main
from tmconvert.converter.configs import derive_target_config
from tmconvert.converter.convert.engine import ConversionResult, ConvertRequest, convert, prepare
from tmconvert.converter.errors import ConfigError
from tmconvert.converter.lint.mappings import check_mapping
from tmconvert.converter.mapping.errors import MappingError
from tmconvert.converter.mapping.files import default_mapping_for, load_mapping
from tmconvert.converter.modelfile.classifier import load_model_file
from tmconvert.models import ViTConfig, build_model, get_config
from tmconvert.models.plainmamba import PlainMamba

MAPPING = REPO / "mappings" / "vit-plainmamba-mlp.yaml"
STEM_RULES = (  # the rules that build the exact stem, and what PlainMamba's own init puts there instead
    (
        "backbone.patch_embed.stem.0.weight: {init: space_to_depth}",
        "backbone.patch_embed.stem.0.weight: {init: default}",
    ),
    ("backbone.patch_embed.convs.0.weight: {init: dirac}", "backbone.patch_embed.convs.0.weight: {init: default}"),
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> ConversionResult:
    out = tmp_path_factory.mktemp("plainmamba") / "pm.safetensors"
    calib = "fashion-mnist[:16]"
    return convert(ConvertRequest(source=TEACHER, target="plainmamba-l1", out=out, calib=calib, format="upstream"))


def _rule(target: str) -> str:
    """The text of one rule of `tensors:` in the shipped mapping: its key line and everything indented below it."""
    lines = MAPPING.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  {target}:"))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("    "))
    return "".join(lines[start:end])


def _variant(tmp_path: Path, replacements: list[tuple[str, str]]) -> Path:
    """The shipped mapping with some rules replaced, as a file of its own (no default claims)."""
    text = MAPPING.read_text().replace('default_for: [plainmamba-l1, plainmamba-l2, plainmamba-l3, "*"]', "")
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "variant.yaml"
    path.write_text(text)
    return path


def test_mapping_checks_on_every_pair_it_supports() -> None:
    loaded = load_mapping(MAPPING)
    pairs, problems = check_mapping(loaded)
    assert problems == []
    assert pairs == [tuple(pair) for pair in loaded.mapping.supports] and len(pairs) == 12
    assert {default_mapping_for(f"plainmamba-l{i}").name for i in (1, 2, 3)} == {MAPPING.name}


def test_the_student_takes_the_teachers_patch_and_image_size_so_the_grids_match() -> None:
    fmnist = derive_target_config("plainmamba-l1", ViTConfig(patch_size=4, img_size=(28, 28)))
    assert (fmnist.patch_size, fmnist.img_size, fmnist.grid) == (4, (28, 28), (7, 7))
    dinov2 = dataclasses.replace(get_config("dinov2-s"), img_size=(112, 112))  # patch 14
    student = derive_target_config("plainmamba-l1", dinov2)
    assert (student.patch_size, student.grid) == (14, dinov2.grid) == (14, (8, 8))
    assert derive_target_config("plainmamba-l2", get_config("deit-b")).grid == (14, 14)
    odd = dataclasses.replace(get_config("deit-s"), patch_size=7, img_size=(224, 224))
    with pytest.raises(ConfigError, match=r"target plainmamba-l1: PlainMambaConfig.patch_size must be even .* got 7"):
        derive_target_config("plainmamba-l1", odd)
    assert derive_target_config("plainmamba-l1", odd, patch_size=8).grid == (28, 28)  # --patch-size resamples


def test_shipped_teacher_converts_and_reloads_strict(converted: ConversionResult) -> None:
    cfg = converted.plan.target.config
    assert (cfg.img_size, cfg.patch_size, cfg.grid, cfg.num_classes) == ((28, 28), 4, (7, 7), 10)
    assert converted.verification["strict_load"] is True
    assert converted.verification["pth_keys"] == converted.verification["keys"] == 361
    report = converted.verify_report
    assert report.ok and report.teacher_comparison == "done", report.problems
    assert [(s.layer, s.block) for s in report.layers[:12]] == [(j, j) for j in range(12)]  # which block fed it
    upstream = torch.load(converted.paths.pth, map_location="cpu", weights_only=True)
    assert set(upstream) == {"state_dict"}  # mmcls's checkpoint container
    state = upstream["state_dict"]
    assert state["backbone.patch_embed.stem.1.num_batches_tracked"].dtype == torch.int64  # the model's own dtype
    PlainMamba(cfg, device="meta").load_state_dict(state, strict=True, assign=True)
    student = load_model_file(converted.paths.weights).model
    assert student.backbone.patch_embed.stem[1].num_batches_tracked.dtype == torch.int64
    assert student(torch.randn(2, 3, 28, 28)).shape == (2, 10)


def test_the_stem_hands_the_teachers_patch_embedding_over(converted: ConversionResult) -> None:
    """Space-to-depth stem, identity convs, BatchNorm at init, the teacher's kernel on the stem's channels: in eval
    mode the student's embedded tokens are the teacher's patch tokens (BatchNorm's eps aside)."""
    teacher, images = teacher_and_images(8)
    student = load_model_file(converted.paths.weights).model.eval()
    with torch.no_grad():
        embedded, grid = student.backbone.embed(images)
        wanted = teacher._embed(images)[:, 1:]  # patch embedding + position, without the cls token
    assert grid == (7, 7)
    torch.testing.assert_close(embedded, wanted, rtol=1e-4, atol=1e-4)


def test_converted_layers_stay_close_to_the_teacher_where_a_scratch_student_does_not(
    converted: ConversionResult, tmp_path: Path
) -> None:
    teacher, images = teacher_and_images()
    student = load_model_file(converted.paths.weights).model
    scratch = build_model(converted.plan.target.config, seed=0)
    ours, theirs = layer_cosines(student, teacher, images, 12), layer_cosines(scratch, teacher, images, 12)
    assert min(ours[:3]) > 0.4 and min(ours) > 0.3, ours  # measured 0.50, 0.50, 0.52 ... 0.42 (scratch: 0.01)
    assert all(o > t + 0.3 for o, t in zip(ours[:3], theirs[:3], strict=True)), (ours, theirs)
    # the built stem is what carries the teacher's embedding: PlainMamba's own stem init keeps much less
    projection = "backbone.patch_embed.projection.weight"
    variant = _variant(tmp_path, [*STEM_RULES, (_rule(projection), f"  {projection}: {{init: default}}\n")])
    out = tmp_path / "default-stem.safetensors"
    convert(ConvertRequest(source=TEACHER, target="plainmamba-l1", mapping=str(variant), out=out, verify=False))
    default_stem = layer_cosines(load_model_file(out).model, teacher, images, 3)
    assert all(o > d + 0.1 for o, d in zip(ours[:3], default_stem, strict=True)), (ours, default_stem)


def test_deit_s_shaped_teacher_subclones_into_plainmamba_l1(tmp_path: Path) -> None:
    """384 -> 192 residual channels, 1536 -> 384 hidden units: LayerNorm weight and bias, fc1's bias and fc2's bias
    are copied at the kept entries (PlainMamba has homes for all of them), out_proj is fc2 scaled and quartered."""
    cfg = ViTConfig(embed_dim=384, depth=12, num_heads=6, mlp_hidden=1536, patch_size=16, img_size=(64, 64))
    state = make_vit_state_dict(cfg, seed=3)
    src = write_checkpoint(state, tmp_path / "deit-s.safetensors")
    result = convert(ConvertRequest(source=src, target="plainmamba-l1", out=tmp_path / "pm.safetensors", calib="4"))
    assert result.verify_report.ok and result.verification["strict_load"]
    assert result.plan.target.config.grid == (4, 4) == cfg.grid
    residual, hidden = result.selection["residual"][None], result.selection["hidden"][2]
    assert len(residual) == 192 and len(hidden) == 384
    student = load_model_file(result.paths.weights).model.state_dict()
    layer = "backbone.layers.2."
    torch.testing.assert_close(student[layer + "norm.weight"], state["blocks.2.norm2.weight"][residual])
    torch.testing.assert_close(student[layer + "norm.bias"], state["blocks.2.norm2.bias"][residual])
    fc1_bias = state["blocks.2.mlp.fc1.bias"][hidden]
    torch.testing.assert_close(student[layer + "mamba.in_proj.bias"], torch.cat([fc1_bias, fc1_bias]))
    torch.testing.assert_close(student[layer + "mamba.out_proj.bias"], state["blocks.2.mlp.fc2.bias"][residual])
    fc2 = state["blocks.2.mlp.fc2.weight"][residual][:, hidden] * (1536 / 384) ** 0.5 / 4
    torch.testing.assert_close(student[layer + "mamba.out_proj.weight"], fc2)
    pos = state["pos_embed"][:, 1:][..., residual]  # the cls slot dropped
    torch.testing.assert_close(student["backbone.pos_embed"], pos)
    torch.testing.assert_close(student["backbone.ln1.bias"], state["norm.bias"][residual])


def test_patch14_teacher_gives_its_own_grid_and_embedding(tmp_path: Path) -> None:
    """A DINOv2-S-shaped teacher (patch 14, LayerScale, no head) at 112 px: the student is PlainMamba-L1 at 112 px
    with a 7x7 projection, on the teacher's 8x8 grid, and embeds the teacher's patch tokens at the kept channels."""
    cfg = dataclasses.replace(get_config("dinov2-s"), img_size=(112, 112), depth=2)
    src = write_checkpoint(make_vit_state_dict(cfg, seed=1), tmp_path / "dinov2.safetensors")
    out = tmp_path / "pm.safetensors"
    result = convert(ConvertRequest(source=src, target="plainmamba-l1", out=out, calib="4", num_heads=6))
    student_cfg = result.plan.target.config
    assert (student_cfg.img_size, student_cfg.patch_size, student_cfg.grid) == ((112, 112), 14, (8, 8))
    assert result.verify_report.ok and result.verify_report.layers[0].block == 0
    student = load_model_file(out).model.eval()
    images = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with open_checkpoint(src, num_heads=6) as ckpt, torch.no_grad():
        wanted = ckpt.model().eval()._embed(images)[:, 1:][..., result.selection["residual"][None]]
        embedded, grid = student.backbone.embed(images)
    assert grid == (8, 8)
    torch.testing.assert_close(embedded, wanted, rtol=1e-4, atol=1e-4 * wanted.abs().max().item())


def test_dry_run_shows_the_plan_with_its_stem(capsys) -> None:
    assert main([str(TEACHER), "--to", "plainmamba-l1", "--dry-run", "--json"]) == 0
    import json

    plan = json.loads(capsys.readouterr().out)
    assert plan["target"]["family"] == "plainmamba" and plan["mapping"]["name"] == "vit-plainmamba-mlp"
    rows = {t["name"]: t for t in plan["tensors"]}
    assert rows["backbone.patch_embed.stem.0.weight"]["expr"] == "init:space_to_depth"
    assert "space_to_depth(channels=64)" in rows["backbone.patch_embed.projection.weight"]["expr"]
    assert rows["backbone.layers.0.dw.0.weight"]["expr"] == "init:dirac"
    assert rows["backbone.layers.3.mamba.in_proj.bias"]["block"] == 3
    assert "cls_token" in plan["dropped_why"]
    assert main(["list", "--json"]) == 0
    targets = {t["name"]: t["family"] for t in json.loads(capsys.readouterr().out)["targets"]}
    assert targets["plainmamba-l1"] == "plainmamba" and targets["videomamba-ti"] == "videomamba"


def test_a_wider_student_is_refused_naming_the_yaml_path(tmp_path, capsys) -> None:
    assert main([str(TEACHER), "--to", "plainmamba-l2", "--out", str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    where = rf"{re.escape(str(MAPPING))}:\d+: index_sets\.residual: keeps 384 \(target\.embed_dim\) of 192 "
    assert re.search(where, err), err
    assert list(tmp_path.iterdir()) == []


def test_a_fit_rule_is_refused_for_a_plainmamba_target(tmp_path: Path) -> None:
    target = "backbone.layers.{layer}.mamba.out_proj.bias"
    variant = _variant(tmp_path, [(_rule(target), f"  {target}: {{fit: mlp}}\n")])
    with pytest.raises(MappingError) as caught:
        prepare(ConvertRequest(source=TEACHER, target="plainmamba-l1", mapping=str(variant), calib="4"))
    problems = str(caught.value).splitlines()[1:]
    assert len(problems) == 1, problems
    assert re.fullmatch(
        rf"{re.escape(str(variant))}:\d+: tensors\.backbone\.layers\.\{{layer\}}\.mamba\.out_proj\.bias\.fit: fit mlp "
        r"builds a layer of vim; a plainmamba target has no such layer \(fits are ViM-only: .*\)",
        problems[0],
    ), problems[0]
