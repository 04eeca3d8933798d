"""Image ViT -> VMamba (`mappings/vit-vmamba.yaml`): the mapping on every pair it lists, the per-stage layer plan,
per-stage residual sets and a stage wider than the teacher, and a tiny teacher converted end to end (every tensor
once, inherited tensors equal to the teacher's subcloned slices, deterministic, strict reload, finite forward), its
verification stage by stage (the CLI without --no-verify; cosines equal to an independent computation on the stage
grids and kept channels) and the dry-run layer table naming blocks by stage."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests._ckpt_factory import make_vit_state_dict, write_checkpoint
from tests._students import REPO
from tmconvert.converter.checkpoint import open_checkpoint
from tmconvert.converter.cli import main
from tmconvert.converter.cli.convert import _layer_rows
from tmconvert.converter.convert.engine import ConversionResult, ConvertRequest, convert
from tmconvert.converter.lint.mappings import check_mapping, plan_for_names
from tmconvert.converter.mapping.files import default_mapping_for, load_mapping
from tmconvert.converter.modelfile.converted import load_converted
from tmconvert.converter.plan.layers import plan_layers, split_over_stages
from tmconvert.converter.plan.plan import SourceSide, TargetSide, build_plan
from tmconvert.converter.verify import numeric
from tmconvert.converter.verify.numeric import verify_converted
from tmconvert.models import ViTConfig, build_model, registry
from tmconvert.models.vit import VisionTransformer
from tmconvert.models.vmamba import VMamba, VMambaConfig

MAPPING = REPO / "mappings" / "vit-vmamba.yaml"
TINY = VMambaConfig(dims=(48, 64, 96, 256), depths=(1, 1, 2, 1), ssm_ratio=1.0, d_state=1)  # stage 3 > the teacher
TEACHER_CFG = ViTConfig(embed_dim=128, depth=4, num_heads=2, mlp_hidden=512, patch_size=4, img_size=(32, 32))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[ConversionResult, dict[str, torch.Tensor], Path]:
    """The tiny teacher converted into the tiny VMamba (registered for this module only)."""
    folder = tmp_path_factory.mktemp("vmamba")
    state = make_vit_state_dict(TEACHER_CFG, seed=3)
    src = write_checkpoint(state, folder / "teacher.safetensors")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(registry._REGISTRY, "vmamba-tiny", TINY)
        request = ConvertRequest(source=src, target="vmamba-tiny", out=folder / "a.safetensors", format="upstream")
        result = convert(_unverified(request))
        again = convert(_unverified(dataclasses.replace(request, out=folder / "b.safetensors")))
    assert again.paths.weights.read_bytes() == result.paths.weights.read_bytes()  # determinism
    return result, state, src


def _unverified(request: ConvertRequest) -> ConvertRequest:
    # the fixture converts twice for determinism; verification is tested on its own below
    return dataclasses.replace(request, verify=False)


def test_mapping_checks_on_every_pair_it_supports() -> None:
    loaded = load_mapping(MAPPING)
    pairs, problems = check_mapping(loaded)
    assert problems == []
    assert pairs == [tuple(pair) for pair in loaded.mapping.supports] and len(pairs) == 10
    assert {default_mapping_for(f"vmamba-{s}").name for s in "tsb"} == {MAPPING.name}


def test_teacher_blocks_share_out_over_the_stages() -> None:
    assert split_over_stages(12, (2, 2, 8, 2)) == (2, 2, 7, 1)
    assert split_over_stages(12, (2, 2, 15, 2)) == (1, 1, 9, 1)
    assert split_over_stages(20, (2, 2, 8, 2)) == (2, 2, 8, 2)
    plan = plan_layers(None, 12, 14, stages=(2, 2, 8, 2))
    assert plan.blocks == (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, None, 11, None)
    assert plan.effective == 12 and plan.label(12) == "stage 3 block 0" and plan.used_blocks(2) == tuple(range(4, 11))
    rows = plan.to_json()
    assert rows[12] == {"layer": 12, "block": 11, "stage": 3, "stage_block": 0}
    assert rows[11] == {"layer": 11, "block": None, "stage": 2, "stage_block": 7}
    four = plan_layers(4, 12, 14, stages=(2, 2, 8, 2))  # --layers 4: the first four teacher blocks
    assert four.blocks == (0, None, 1, None, 2, 3, *[None] * 8)
    spread = plan_layers(21, 12, 21, stages=(2, 2, 15, 2))  # more student blocks than teacher blocks: spread
    assert spread.blocks[:4] == (0, 0, 1, 1) and spread.blocks[-1] == 11 and None not in spread.blocks


def test_per_stage_index_sets_and_a_stage_wider_than_the_teacher() -> None:
    plan = plan_for_names(load_mapping(MAPPING), "deit-s", "vmamba-t")
    assert plan.problems == []
    sets = {name: (s.keep, s.full, s.blocks) for name, s in plan.index_sets.items()}
    assert [sets[f"residual@{s}"][:2] for s in range(4)] == [(96, 384), (192, 384), (384, 384), (384, 384)]
    assert sets["value@2"] == (384, 384, tuple(range(4, 11))) and sets["hidden@0"] == (384, 1536, (0, 1))
    stage3 = [w for w in plan.warnings if w.startswith("stage 3 is wider than the teacher")]
    assert len(stage3) == 1 and "residual@3 768 of 384 (source.embed_dim)" in stage3[0]
    rows = {e.name: e for e in plan.entries}
    wide = rows["layers.3.blocks.0.mlp.fc1.weight"]
    assert (wide.shape, wide.kind, wide.block, wide.stage) == ((3072, 768), "partial", 11, 3)
    assert "set=residual@-1" in rows["classifier.head.weight"].expr
    assert rows["layers.2.blocks.7.op.in_proj.weight"].expr == "init:default"  # a rest block
    assert rows["layers.0.blocks.0.op.in_proj.weight"].kind == "subcloned"  # its fill parts come out empty
    assert plan_for_names(load_mapping(MAPPING), "deit-b", "vmamba-t").counts()["partial"] == 0


def test_a_stage_wider_than_the_teacher_is_refused_without_upto(tmp_path: Path) -> None:
    text = MAPPING.read_text().replace('default_for: [vmamba-t, vmamba-s, vmamba-b, "*"]', "")
    text = text.replace("    upto: true  # a stage wider than the teacher: all D, the rest upstream init\n", "")
    variant = tmp_path / "strict.yaml"
    variant.write_text(text)
    plan = plan_for_names(load_mapping(variant), "deit-s", "vmamba-t")
    (problem,) = [p for p in plan.problems if p.path == "index_sets.residual"]
    assert problem.message.startswith("stage 3 keeps 768 (target.dims) of 384 (source.embed_dim) entries: a stage")
    assert plan_for_names(load_mapping(variant), "deit-b", "vmamba-t").problems == []


def test_tiny_teacher_converts_every_tensor_once_and_reloads_strict(tiny) -> None:
    result, _, _ = tiny
    names = [e.name for e in result.plan.entries]
    expected = build_model(result.plan.target.config, device="meta").state_dict()
    assert sorted(names) == sorted(expected) and len(set(names)) == len(names)
    cfg, state, metadata = load_converted(result.paths.weights)
    assert cfg == result.plan.target.config and cfg.img_size == (32, 32) and cfg.num_classes == 1000
    VMamba(cfg, device="meta").load_state_dict(state, strict=True, assign=True)
    upstream = torch.load(result.paths.pth, map_location="cpu", weights_only=True)
    assert set(upstream) == {"model"} and set(upstream["model"]) == set(state)  # VMamba's `checkpoint['model']`
    assert [(r["stage"], r["stage_block"], r["block"]) for r in metadata["layer_plan"]] == [
        (0, 0, 0),
        (1, 0, 1),
        (2, 0, 2),
        (2, 1, None),
        (3, 0, 3),
    ]
    model = build_model(cfg)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = model.eval().forward_all(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert out.logits.shape == (2, 1000) and bool(torch.isfinite(out.logits).all())
    assert [t.shape[-1] for t in out.layer_tokens] == [48, 64, 96, 96, 256]


def test_inherited_tensors_are_the_teachers_subcloned_slices(tiny) -> None:
    result, teacher, _ = tiny
    student = load_file(result.paths.weights)
    sel = result.selection
    r0, r1, r3 = (sel[f"residual@{s}"][None] for s in (0, 1, 3))
    assert len(r0) == 48 and len(r1) == 64 and set(r0.tolist()) <= set(r1.tolist())  # one ranking: nested sets
    assert r3.tolist() == list(range(128))  # stage 3 (256) is wider than the teacher (128): all of it, then init
    value, hidden = sel["value@1"][1], sel["hidden@1"][1]
    block = "layers.1.blocks.0."
    torch.testing.assert_close(student[block + "norm.weight"], teacher["blocks.1.norm1.weight"][r1])
    torch.testing.assert_close(student[block + "norm2.bias"], teacher["blocks.1.norm2.bias"][r1])
    v_rows = teacher["blocks.1.attn.qkv.weight"][256:384][value][:, r1] * (128 / 64) ** 0.5
    torch.testing.assert_close(student[block + "op.in_proj.weight"], v_rows)
    proj = teacher["blocks.1.attn.proj.weight"][r1][:, value] * (128 / 64) ** 0.5
    torch.testing.assert_close(student[block + "op.out_proj.weight"], proj)
    torch.testing.assert_close(student[block + "mlp.fc1.bias"], teacher["blocks.1.mlp.fc1.bias"][hidden])
    fc2 = teacher["blocks.1.mlp.fc2.weight"][r1][:, hidden] * (512 / 256) ** 0.5
    torch.testing.assert_close(student[block + "mlp.fc2.weight"], fc2)
    # the wide stage: the teacher's channels first, VMamba's upstream init for the rest
    default = build_model(result.plan.target.config, seed=0).state_dict()
    norm = student["layers.3.blocks.0.norm2.weight"]
    torch.testing.assert_close(norm[:128], teacher["blocks.3.norm2.weight"])
    torch.testing.assert_close(norm[128:], default["layers.3.blocks.0.norm2.weight"][128:])
    fc1 = student["layers.3.blocks.0.mlp.fc1.weight"]
    torch.testing.assert_close(fc1[:512, :128], teacher["blocks.3.mlp.fc1.weight"])
    torch.testing.assert_close(fc1[512:], default["layers.3.blocks.0.mlp.fc1.weight"][512:])
    torch.testing.assert_close(fc1[:512, 128:], default["layers.3.blocks.0.mlp.fc1.weight"][:512, 128:])
    torch.testing.assert_close(student["classifier.norm.weight"][:128], teacher["norm.weight"])
    torch.testing.assert_close(student["classifier.head.weight"][:, :128], teacher["head.weight"])
    rest = "layers.2.blocks.1.op.in_proj.weight"  # teacher depth 4, student 5: one block starts from upstream init
    torch.testing.assert_close(student[rest], default[rest])


def test_dry_run_shows_the_stage_plan(tmp_path: Path, capsys) -> None:
    src = write_checkpoint(make_vit_state_dict(TEACHER_CFG, seed=1), tmp_path / "teacher.safetensors")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(registry._REGISTRY, "vmamba-tiny", TINY)
        assert main([str(src), "--to", "vmamba-tiny", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["target"]["family"] == "vmamba" and plan["mapping"]["name"] == "vit-vmamba"
    assert plan["layers"][4] == {"layer": 4, "block": 3, "stage": 3, "stage_block": 0}
    assert plan["index_sets"]["residual@3"]["keep"] == 128
    assert "pos_embed" in plan["dropped_why"]


def test_the_built_stem_embeds_patches_as_the_teacher_does(tiny) -> None:
    """Space-to-depth conv, LayerNorm, GELU, then the teacher's patch kernel off the +/- channels: each 4x4 patch is
    the teacher's patch embedding scaled per 2x2 block by its RMS, then layer-normed. On images whose 2x2 blocks all
    have the same RMS (a constant |pixel|, random signs) that scale is one number per token, so the stem's tokens are
    exactly LayerNorm(the teacher's patch embedding) at the kept channels."""
    result, teacher, _ = tiny
    cfg, state, _ = load_converted(result.paths.weights)
    model = build_model(cfg)
    model.load_state_dict(state, strict=True)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 2, (2, 3, 32, 32), generator=gen).float() * 2 - 1
    keep = result.selection["residual@0"][None]
    weight, bias = teacher["patch_embed.proj.weight"][keep], teacher["patch_embed.proj.bias"][keep]
    with torch.no_grad():
        tokens = model.patch_embed(images)  # (B, 8, 8, 48)
        wanted = torch.nn.functional.conv2d(images, weight, stride=4).permute(0, 2, 3, 1)
        rms = (images[:, :, :2, :2] ** 2).mean().sqrt()  # 1: every block has |pixel| = 1
        wanted = torch.nn.functional.layer_norm(wanted / rms + bias, (48,), eps=cfg.norm_eps)
    torch.testing.assert_close(tokens, wanted, rtol=1e-4, atol=1e-4)


def test_a_stem_too_narrow_for_the_pixels_keeps_its_upstream_init() -> None:
    """A 4-wide stem cannot hold the 24 +/- sub-pixel channels of 3-colour images: the guard keeps its own stem."""
    narrow = VMambaConfig(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), img_size=(32, 32))
    assert not narrow.stem_holds_pixels and TINY.stem_holds_pixels
    plan = build_plan(
        load_mapping(MAPPING), SourceSide.from_config(TEACHER_CFG), TargetSide.from_config("narrow", narrow)
    )
    assert plan.problems == []
    rows = {e.name: e for e in plan.entries}
    assert rows["patch_embed.0.weight"].expr == "init:default" and rows["patch_embed.5.weight"].expr == "init:default"


def test_patch_merging_carries_each_kept_channel_into_the_next_stage(tiny) -> None:
    """The stages' sets nest, so the 3x3 stride-2 merging conv maps each channel of stage s to the same teacher
    channel in stage s + 1, averaging the 2x2 block it covers (`eye` | select | select | spread_kernel)."""
    result, _, _ = tiny
    student = load_file(result.paths.weights)
    rows = {e.name: e for e in result.plan.entries}
    assert rows["layers.0.downsample.1.weight"].expr.startswith(
        "cat0[cat1[eye(128) | select(dim=0, set=residual@+1) | select(dim=1, set=residual) | spread_kernel("
    )
    for stage in (0, 2):  # 48 -> 64 channels; 96 -> 256, of which the teacher has 128
        kept, following = (result.selection[f"residual@{s}"][None].tolist() for s in (stage, stage + 1))
        weight = student[f"layers.{stage}.downsample.1.weight"]
        wanted = torch.zeros_like(weight)
        for i, channel in enumerate(kept):
            wanted[following.index(channel), i, 1:3, 1:3] = 0.25
        torch.testing.assert_close(weight, wanted)
        assert not student[f"layers.{stage}.downsample.1.bias"].any()
    model = build_model(result.plan.target.config)
    model.load_state_dict(student, strict=True)
    x = torch.randn(1, 8, 8, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = model.layers[0].downsample[1](x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    pooled = torch.nn.functional.avg_pool2d(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    at = [result.selection["residual@1"][None].tolist().index(c) for c in result.selection["residual@0"][None].tolist()]
    torch.testing.assert_close(merged[..., at], pooled)


def test_a_relative_stage_set_needs_a_stage(tmp_path: Path) -> None:
    text = MAPPING.read_text().replace('default_for: [vmamba-t, vmamba-s, vmamba-b, "*"]', "")
    text = text.replace("set: residual@-1}", "set: residual@+1}", 1)  # classifier.norm.weight is in no stage
    variant = tmp_path / "relative.yaml"
    variant.write_text(text)
    problems = [p.message for p in plan_for_names(load_mapping(variant), "deit-b", "vmamba-t").problems]
    assert any("`@+1` is relative, and this tensor is in no stage" in m for m in problems), problems


CELL = re.compile(r"stage (\d) block (\d)←(\d+) (-?\d\.\d{3})")


def test_cli_conversion_verifies_stage_by_stage(tmp_path: Path, capsys, monkeypatch) -> None:
    """Without --no-verify the written VMamba reloads strictly, runs finite, and each block is compared on its stage
    grid with its teacher block; the rest block is said to be not compared."""
    src = write_checkpoint(make_vit_state_dict(TEACHER_CFG, seed=3), tmp_path / "teacher.safetensors")
    monkeypatch.setitem(registry._REGISTRY, "vmamba-tiny", TINY)
    monkeypatch.setenv("COLUMNS", "300")
    assert main([str(src), "--to", "vmamba-tiny", "--out", str(tmp_path / "t.safetensors")]) == 0
    text = capsys.readouterr().out
    cells = CELL.findall(text)
    assert [cell[:3] for cell in cells] == [("0", "0", "0"), ("1", "0", "1"), ("2", "0", "2"), ("3", "0", "3")]
    assert all(math.isfinite(float(cell[3])) for cell in cells)
    assert "stage 2 block 1: no teacher block fed them" in text and "strict_load=True" in text

    assert main([str(src), "--to", "vmamba-tiny", "--out", str(tmp_path / "j.safetensors"), "--json"]) == 0
    verification = json.loads(capsys.readouterr().out)["verification"]
    report = verification["numeric"]
    assert verification["strict_load"] and report["ok"] and report["finite"] and report["problems"] == []
    assert report["teacher_comparison"] == "done" and report["not_compared"] == {}
    rows = [(r["layer"], r["stage"], r["stage_block"], r["block"]) for r in report["layers"]]
    assert rows == [(0, 0, 0, 0), (1, 1, 0, 1), (2, 2, 0, 2), (4, 3, 0, 3)]
    assert [round(r["cosine"], 3) for r in report["layers"]] == [float(cell[3]) for cell in cells]
    assert all(-1 <= r["cosine"] <= 1 for r in report["layers"]) and math.isfinite(report["final_cosine"])
    assert report["layers_not_compared"] == ["stage 2 block 1"]
    assert report["backends"]["reference"] == 0.0


def _independent_cosines(path: Path, teacher_state: dict, images: torch.Tensor) -> tuple[list[float], float]:
    """Per inherited block and for the final features: the teacher's patch tokens (8x8) averaged over whole windows to
    the stage grid (8, 4, 2, 1), at the stage's residual@s channels, against the student's first len(set) channels."""
    cfg, state, meta = load_converted(path)
    student = build_model(cfg)
    student.load_state_dict(state, strict=True)
    vit = VisionTransformer(dataclasses.replace(TEACHER_CFG, num_classes=1000))
    vit.load_state_dict(teacher_state)
    with torch.no_grad():
        s_out, t_out = student.eval().forward_all(images), vit.eval().forward_all(images)
    sets = meta["index_sets"]

    def cosine(tokens: torch.Tensor, teacher: torch.Tensor, stage: int) -> float:
        (kept,) = sets[f"residual@{stage}"]["indices"].values()
        patches = teacher[:, 1:].unflatten(1, (8, 8)).permute(0, 3, 1, 2)[:, kept]
        pooled = F.avg_pool2d(patches.double(), 8 // cfg.stage_grids()[stage][0]).flatten(2).transpose(1, 2)
        return F.cosine_similarity(tokens[..., : len(kept)].double(), pooled, dim=-1).mean().item()

    layers = [
        cosine(s_out.layer_tokens[j], t_out.layer_tokens[b], s)
        for j, b, s in ((0, 0, 0), (1, 1, 1), (2, 2, 2), (4, 3, 3))
    ]
    return layers, cosine(s_out.final_tokens, t_out.final_tokens, 3)


def test_stage_cosines_match_an_independent_computation(tiny, monkeypatch) -> None:
    result, teacher_state, src = tiny
    with open_checkpoint(src) as ckpt:
        report = verify_converted(result.paths.weights, teacher=ckpt, calib=4, seed=1, backends=["reference"])
        monkeypatch.setattr(numeric, "CPU_SCAN_ELEMENTS", 1)  # one image at a time: the same numbers
        one_by_one = verify_converted(result.paths.weights, teacher=ckpt, calib=4, seed=1, backends=["reference"])
    assert report.ok and report.teacher_comparison == "done" and report.images == 4
    assert [s.label for s in report.layers] == [
        "stage 0 block 0",
        "stage 1 block 0",
        "stage 2 block 0",
        "stage 3 block 0",
    ]
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # calib=4, seed=1: seeded noise
    layers, final = _independent_cosines(result.paths.weights, teacher_state, images)
    assert [s.cosine for s in report.layers] == pytest.approx(layers, abs=1e-9)
    assert report.final_cosine == pytest.approx(final, abs=1e-9)
    assert [s.cosine for s in one_by_one.layers] == pytest.approx(layers, abs=1e-6)
    cfg = result.plan.target.config  # 32 px: stage 0's 8x8 tokens x 4 scans x 48 channels is the largest scan
    assert numeric.scan_elements_per_image(cfg, cfg.token_layout()) == 8 * 8 * 4 * 48 * 1
    assert numeric.scan_elements_per_image(TINY, TINY.token_layout()) == 56 * 56 * 4 * 48 * 1  # at 224 px


def test_stages_without_recorded_channels_are_not_compared(tiny, tmp_path: Path) -> None:
    result, _, src = tiny
    with safe_open(str(result.paths.weights), framework="pt") as handle:
        meta = dict(handle.metadata())
        state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (not a dict)
    meta.pop("index_sets")
    save_file(state, str(tmp_path / "no-sets.safetensors"), metadata=meta)
    with open_checkpoint(src) as ckpt:
        report = verify_converted(tmp_path / "no-sets.safetensors", teacher=ckpt, calib=2, require_teacher=True)
    why = (
        "stage 0 is 48 channels wide and the teacher 128, and the file records no residual@0 channel set that fits "
        "this teacher"
    )
    assert report.not_compared == {"layers": why, "final": why} and report.teacher_comparison == "partial"
    assert report.problems == [f"no comparison with the teacher: {why}"] and report.top1_agreement is not None


def test_dry_run_table_names_blocks_by_stage(tmp_path: Path, capsys, monkeypatch) -> None:
    src = write_checkpoint(make_vit_state_dict(TEACHER_CFG, seed=1), tmp_path / "teacher.safetensors")
    monkeypatch.setitem(registry._REGISTRY, "vmamba-tiny", TINY)
    monkeypatch.setenv("COLUMNS", "300")
    assert main([str(src), "--to", "vmamba-tiny", "--dry-run"]) == 0
    text = capsys.readouterr().out
    table = text[text.index("layer plan") : text.index("index sets")]
    rows = [[cell.strip() for cell in line.split("│")[1:3]] for line in table.splitlines() if line.startswith("│")]
    assert rows == [
        ["stage 0 block 0", "0"],
        ["stage 1 block 0", "1"],
        ["stage 2 block 0", "2"],
        ["stage 3 block 0", "3"],
        ["stage 2 block 1", "none: default init"],
    ]
    vmamba_t = SimpleNamespace(layers=plan_layers(None, 12, 14, stages=(2, 2, 8, 2)), options={})
    assert _layer_rows(vmamba_t) == [
        ("stage 0 blocks 0-1", "0-1"),
        ("stage 1 blocks 0-1", "2-3"),
        ("stage 2 blocks 0-6", "4-10"),
        ("stage 3 block 0", "11"),
        ("stage 2 block 7, stage 3 block 1", "none: default init"),
    ]
    flat = SimpleNamespace(layers=plan_layers(None, 12, 24), options={"identity_rest": True})  # unchanged
    assert _layer_rows(flat) == [("0-11", "0-11"), ("12-23", "none: identity start (zero out_proj)")]
