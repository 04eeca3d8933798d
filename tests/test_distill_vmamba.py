"""Distillation and evaluation of a VMamba student (hierarchical: four stages on grids of their own) from an image ViT
teacher: the pair table, the two ways a stage grid meets the teacher's patch grid (`loss.grid`: pool, interpolate)
on known inputs, each cross-scan direction put in the model's own scan order on the common grid, a short CPU run
that lowers the loss and writes a student `tmconvert eval` reads, and one-line errors."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from tests._distill_factory import TEST_RECIPE, recipe, registered, request, write_teacher
from tmconvert.converter.cli import main
from tmconvert.converter.distill.families import feature_alignment, pair_table
from tmconvert.converter.distill.grids import DEFAULT_GRID_MATCH, GridError, GridMatch, common_grid, resample
from tmconvert.converter.distill.recipe import LossRecipe, Recipe
from tmconvert.converter.distill.run import even_pairs, prepare_run, run_distillation
from tmconvert.converter.modelfile.classifier import load_model_file
from tmconvert.converter.modelfile.converted import read_metadata
from tmconvert.models import ViTConfig, build_model
from tmconvert.models.vmamba import VMamba, VMambaConfig, cross_merge

# 32 px, patch 8: a 4x4 patch grid (+ cls), four blocks. The student reads 32 px on stage grids 8, 4, 2, 1: finer,
# equal, coarser and a single token, widths 8, 16, 32, 64 (ssm_ratio 1).
TEACHER = ViTConfig(embed_dim=32, depth=4, num_heads=2, mlp_hidden=64, patch_size=8, img_size=(32, 32), num_classes=10)
STUDENT = VMambaConfig(dims=8, depths=(1, 1, 2, 1), d_state=1)
NAME = "vmamba-test-distill"
SHORT = ["optim.warmup_fraction=0", "data.augment=none", "data.hflip=false"]


def _student_cfg(img: int = 32) -> VMambaConfig:
    """The student reading `img` px images into the teacher's 10 classes (what a from-scratch run derives)."""
    return dataclasses.replace(STUDENT, img_size=(img, img), num_classes=10)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    return write_teacher(tmp_path_factory.mktemp("vmamba") / "teacher.safetensors", TEACHER)


# ---------------------------------------------------------------------------------------------------------------
# Pairs and grids


def test_pair_table_pairs_every_block_in_order_and_names_the_grids():
    cfg = _student_cfg()
    assert cfg.stage_grids() == [(8, 8), (4, 4), (2, 2), (1, 1)] and cfg.block_stages() == [0, 1, 2, 2, 3]
    pairs = even_pairs(len(cfg.block_stages()), TEACHER.depth)
    assert pairs == [(0, 0), (1, 1), (2, 2), (4, 3)]  # one block of every stage
    pool = pair_table(cfg, TEACHER, pairs, "pool")
    assert [(r["layer"], r["block"], r["stage"]) for r in pool] == [(0, 0, 0), (1, 1, 1), (2, 2, 2), (4, 3, 3)]
    assert [r["student_grid"] for r in pool] == [[8, 8], [4, 4], [2, 2], [1, 1]]
    assert [r["student_width"] for r in pool] == [8, 16, 32, 64]
    assert all(r["teacher_grid"] == [4, 4] and r["teacher_width"] == 32 for r in pool)
    assert [r["common_grid"] for r in pool] == [[4, 4], [4, 4], [2, 2], [1, 1]]  # the coarser grid
    interpolate = pair_table(cfg, TEACHER, pairs, "interpolate")
    assert [r["common_grid"] for r in interpolate] == [[8, 8], [4, 4], [4, 4], [4, 4]]  # the finer grid
    assert DEFAULT_GRID_MATCH == Recipe().loss.grid == "interpolate"
    # VMamba-T against a ViT/16 at 224 px: 14 blocks, 12 teacher blocks
    vmamba_t = VMambaConfig()
    assert even_pairs(len(vmamba_t.block_stages()), 12) == [
        (0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (6, 5), (7, 6), (8, 7), (9, 8), (10, 9), (11, 10), (13, 11)
    ]  # fmt: skip
    assert [common_grid(g, (14, 14), "pool") for g in vmamba_t.stage_grids()] == [(14, 14)] * 3 + [(7, 7)]
    assert [common_grid(g, (14, 14), "interpolate") for g in vmamba_t.stage_grids()] == [(56, 56), (28, 28)] + [
        (14, 14)
    ] * 2


def test_the_recorded_recipe_names_the_grid_match_only_when_it_is_not_the_default():
    assert "grid" not in Recipe().to_json()["loss"]  # runs from before VMamba keep their fingerprints
    pool = Recipe.model_validate({"loss": {"grid": "pool"}})
    assert pool.to_json()["loss"]["grid"] == "pool" and pool.fingerprint_view() != Recipe().fingerprint_view()
    assert Recipe.model_validate(pool.to_json()) == pool


def test_pooling_and_interpolation_of_known_grids():
    ramp = torch.arange(16.0).view(1, 16, 1)  # raster value p on a 4x4 grid
    torch.testing.assert_close(resample(ramp, (4, 4), (2, 2), "pool").flatten(), torch.tensor([2.5, 4.5, 10.5, 12.5]))
    torch.testing.assert_close(resample(ramp, (4, 4), (1, 1), "pool").flatten(), torch.tensor([7.5]))
    constant = torch.full((2, 64, 3), 0.7)
    torch.testing.assert_close(resample(constant, (8, 8), (4, 4), "pool"), torch.full((2, 16, 3), 0.7))
    torch.testing.assert_close(resample(constant, (8, 8), (16, 16), "interpolate"), torch.full((2, 256, 3), 0.7))
    # bilinear, half-pixel centres: a 2x2 grid [[0, 1], [2, 3]] sampled at -0.25, 0.25, 0.75, 1.25 (edges clamped)
    up = resample(torch.arange(4.0).view(1, 4, 1), (2, 2), (4, 4), "interpolate").view(4, 4)
    side = torch.tensor([0.0, 0.25, 0.75, 1.0])
    torch.testing.assert_close(up, 2 * side[:, None] + side[None, :])
    assert resample(ramp, (4, 4), (4, 4), "pool") is ramp
    with pytest.raises(GridError, match="cannot pool a 4x4 grid to 3x3"):
        resample(ramp, (4, 4), (3, 3), "pool")


def test_teacher_tokens_on_the_common_grid_in_each_scan_order():
    student = build_model(_student_cfg(), seed=0)
    alignment = feature_alignment(student, TEACHER, [(0, 0), (1, 1), (2, 2), (4, 3)], None, LossRecipe(grid="pool"))
    assert alignment.directions == ["row", "col", "row_rev", "col_rev"] and alignment.stages == [0, 1, 2, 3]
    teacher = torch.arange(17.0)[None, :, None]  # teacher position j holds j: cls 0, patch p at 1 + p
    # stage 2 (2x2) against the 4x4 teacher grid: teacher 2x2 windows averaged
    blocks = [3.5, 5.5, 11.5, 13.5]  # mean of positions 1,2,5,6 / 3,4,7,8 / 9,10,13,14 / 11,12,15,16
    expected = {"row": [0, 1, 2, 3], "col": [0, 2, 1, 3], "row_rev": [3, 2, 1, 0], "col_rev": [3, 1, 2, 0]}
    for name, order in expected.items():
        assert student.scan_orders(grid=(2, 2))[name].tolist() == order
        got = alignment.teacher_in_scan_order(teacher, name, stage=2)[0, :, 0].tolist()
        assert got == [blocks[p] for p in order]
    # stage 1 is on the teacher's grid: the patches gathered in the stage's own scan order, the cls left out
    for name, order in student.scan_orders(1).items():
        assert alignment.teacher_in_scan_order(teacher, name, stage=1)[0, :, 0].tolist() == (order + 1.0).tolist()
    # stage 3 (one token): the mean of the 16 patches
    assert alignment.teacher_in_scan_order(teacher, "col", stage=3)[0, :, 0].tolist() == [8.5]
    # interpolate: stage 0 (8x8) against 4x4: the teacher grid resampled up to 8x8, then put in each scan order
    up = feature_alignment(student, TEACHER, [(0, 0)], None, LossRecipe(grid="interpolate"))
    raster = resample(teacher[:, 1:], (4, 4), (8, 8), "interpolate")
    for name, order in student.scan_orders(0).items():
        torch.testing.assert_close(up.teacher_in_scan_order(teacher, name, stage=0), raster[:, order])


def test_each_direction_is_unscanned_with_the_models_own_orders():
    """The student side: a direction's outputs in its scan order on the stage grid go back to raster by the model's
    own order (their sum is the model's `cross_merge`), are resampled, then put in the direction's order on the
    common grid (the model's `scan_orders(grid=...)`)."""
    cfg = _student_cfg()
    student = build_model(cfg, seed=0)
    with torch.no_grad():
        out = student.forward_all(torch.randn(2, 3, 32, 32), return_directions=True)
    for mode, common in (("pool", (4, 4)), ("interpolate", (8, 8))):
        alignment = feature_alignment(student, TEACHER, [(0, 0), (4, 3)], None, LossRecipe(grid=mode))
        match: GridMatch = alignment.matches["0"]
        assert match.common == common and match.resamples_student == (mode == "pool")
        orders, common_orders = student.scan_orders(0), student.scan_orders(grid=common)
        ys = out.directions[0]
        if mode == "pool":
            rasters = [ys[name].index_select(1, getattr(match, f"to_raster_{name}")) for name in orders]
            merged = cross_merge(torch.stack([ys[name].transpose(1, 2) for name in orders], dim=1), (8, 8))
            torch.testing.assert_close(sum(rasters), merged.transpose(1, 2))
        for name in orders:
            got = match.student_in_scan_order(ys[name], name, nn.Identity())
            raster = ys[name][:, torch.argsort(orders[name])]
            expected = resample(raster, (8, 8), common, mode)[:, common_orders[name]]
            torch.testing.assert_close(got, expected)
    # a student coarser than the teacher (stage 3, 1x1) is interpolated up after its projector
    up = feature_alignment(student, TEACHER, [(4, 3)], None, LossRecipe(grid="interpolate", projector="linear"))
    y = out.directions[4]["row_rev"]
    projected = up.projectors[0](y)
    got = up.matches["3"].student_in_scan_order(y, "row_rev", up.projectors[0])
    torch.testing.assert_close(got, projected.expand(-1, 16, -1))


def test_errors_name_the_grids_and_the_way_out(tmp_path):
    cfg = _student_cfg(24)  # stage grids 6, 3, 2, 1 against a 24 px / patch 8 teacher's 3x3
    teacher = ViTConfig(embed_dim=32, depth=4, num_heads=2, mlp_hidden=64, patch_size=8, img_size=(24, 24))
    assert cfg.stage_grids() == [(6, 6), (3, 3), (2, 2), (1, 1)]
    with pytest.raises(GridError, match=r"^loss.grid pool: student grid 2x2 and teacher grid 3x3 are not whole .*"):
        pair_table(cfg, teacher, [(2, 0)], "pool")
    assert pair_table(cfg, teacher, [(2, 0)], "interpolate")[0]["common_grid"] == [3, 3]
    assert [r["common_grid"] for r in pair_table(cfg, teacher, [(0, 0), (1, 1), (4, 2)], "pool")] == [
        [3, 3],
        [3, 3],
        [1, 1],
    ]
    with pytest.raises(GridError, match=r"loss.grid 'nearest': choose one of pool, interpolate"):
        common_grid((2, 2), (3, 3), "nearest")


def _cli_error(capsys, args: list[str]) -> str:
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.count("\n") == 1, err
    return err


def test_cli_refuses_unsupported_combinations_in_one_line(tmp_path, capsys):
    teacher = write_teacher(
        tmp_path / "t24.safetensors",
        ViTConfig(embed_dim=32, depth=4, num_heads=2, mlp_hidden=64, patch_size=8, img_size=(24, 24), num_classes=10),
    )
    (tmp_path / "recipe.yaml").write_text(TEST_RECIPE)
    base = ["distill", str(teacher), NAME, "--recipe", str(tmp_path / "recipe.yaml"), "--heads", "2"]
    base += ["--batch-size", "4", "--steps", "2", "--device", "cpu", "--json"]
    with registered(**{NAME: STUDENT}):
        pairs = ["--data", "synthetic:8", "--pairs", "2:0"]  # stage 2 (2x2) against the teacher's 3x3
        assert main([*base, *pairs, "--out", str(tmp_path / "a")]) == 0  # interpolate (the default) pairs any grids
        err = _cli_error(capsys, [*base, *pairs, "--out", str(tmp_path / "b"), "--set", "loss.grid=pool"])
        assert "loss.grid pool: student grid 2x2 and teacher grid 3x3 are not whole multiples" in err
        assert "set loss.grid=interpolate" in err
        err = _cli_error(capsys, [*base, "--data", "clips:2:synthetic:8", "--out", str(tmp_path / "c")])
        assert "clips need a video student (videomamba), this one is a vmamba" in err
        err = _cli_error(
            capsys, [*base, "--data", "synthetic:8", "--out", str(tmp_path / "d"), "--set", "align.steps=2"]
        )
        assert "align.steps: the layer-wise alignment phase aligns ViM layers only" in err and "vmamba" in err
        err = _cli_error(capsys, [*base, "--data", "synthetic:8", "--out", str(tmp_path / "e"), "--set", "loss.grid=x"])
        assert "loss.grid" in err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------------------------------------------
# Runs


def _records(result) -> list[dict]:
    return [json.loads(line) for line in result.paths.metrics.read_text().splitlines() if '"loss"' in line]


@pytest.mark.parametrize("grid", ["pool", "interpolate"])
def test_from_scratch_vmamba_distils_writes_a_loadable_student_and_evaluates(teacher_file, tmp_path, capsys, grid):
    steps = 12
    loaded = recipe(tmp_path, [*SHORT, f"loss.grid={grid}", "optim.lr=3e-3"], steps=steps, batch_size=8)
    with registered(**{NAME: STUDENT}):
        prepared = prepare_run(request(teacher_file, NAME, "synthetic:8", tmp_path / "run", loaded))
        result = run_distillation(prepared)
    assert result.finished and result.step == steps
    assert prepared.pairs == [(0, 0), (1, 1), (2, 2), (4, 3)]
    run = json.loads(result.paths.run.read_text())
    assert run["pair_grids"]["match"] == grid
    assert [r["common_grid"] for r in run["pair_grids"]["pairs"]] == (
        [[4, 4], [4, 4], [2, 2], [1, 1]] if grid == "pool" else [[8, 8], [4, 4], [4, 4], [4, 4]]
    )
    records = _records(result)
    assert len(records) == steps
    for record in records:
        assert sorted(record["similarities"]) == ["col", "col_rev", "row", "row_rev"]
        assert all(len(v) == 4 and all(math.isfinite(x) for x in v) for v in record["similarities"].values())
        assert all(len(v) == 4 for v in record["weights"].values())
        assert all(math.isfinite(record[k]) for k in ("loss", "task", "kd", "feature"))
    first, last = records[0], records[-1]
    assert last["feature"] < first["feature"] - 0.05 and last["loss"] < first["loss"]
    first_cos, last_cos = (sum(sum(v) for v in r["similarities"].values()) / 16 for r in (first, last))
    assert last_cos > first_cos + 0.05  # measured: +0.21 (pool), +0.13 (interpolate)

    meta = read_metadata(result.paths.student)
    assert meta["family"] == "vmamba" and meta["distill"]["pairs"] == [[0, 0], [1, 1], [2, 2], [4, 3]]
    assert [e["layer"] for e in meta["layer_plan"]] == [0, 1, 2, 3, 4]
    student = load_model_file(result.paths.student)
    assert isinstance(student.model, VMamba) and student.config == prepared.student_config
    torch.testing.assert_close(student.model.state_dict(), prepared.student.state_dict())

    capsys.readouterr()
    args = ["eval", str(result.paths.student), "--data", "synthetic:24", "--device", "cpu", "--workers", "0"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "vmamba" and report["images"] == 24
    assert 0.0 <= report["top1"] <= 1.0 and math.isfinite(report["loss"])


def test_a_converted_vmamba_pairs_by_its_layer_plan(teacher_file, tmp_path):
    """A student converted by `mappings/vit-vmamba.yaml`: its layer plan numbers blocks over all stages, as the
    distillation does; a block no teacher block fed (block null) is not paired."""
    from tmconvert.converter.convert.engine import ConvertRequest, convert

    out = tmp_path / "student.safetensors"
    with registered(**{NAME: STUDENT}):
        convert(ConvertRequest(source=teacher_file, target=NAME, out=out, verify=False, num_heads=2))
    plan = read_metadata(out)["layer_plan"]
    expected = [(e["layer"], e["block"]) for e in plan if e["block"] is not None]
    assert [e["stage"] for e in plan] == [0, 1, 2, 2, 3] and len(expected) >= 2
    loaded = recipe(tmp_path, [*SHORT, "loss.grid=pool"], steps=2, batch_size=8)
    prepared = prepare_run(request(teacher_file, out, "synthetic:8", tmp_path / "run", loaded))
    assert prepared.pairs == expected
    result = run_distillation(prepared)
    assert result.finished and all(math.isfinite(r["feature"]) for r in _records(result))
    assert read_metadata(result.paths.student)["layer_plan"] == plan
