"""End-to-end conversions of tiny synthetic checkpoints: strict loading, exact copies, subcloning maths, options."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests._ckpt_factory import SMALL, make_vit_state_dict, write_checkpoint
from tmconvert.converter.convert.engine import ConvertRequest, convert, prepare
from tmconvert.converter.mapping.errors import MappingError
from tmconvert.converter.modelfile.converted import load_converted, read_metadata
from tmconvert.models import registry as registry_module
from tmconvert.models.registry import register
from tmconvert.models.vim import VimConfig, VisionMamba

# SMALL: D=32, depth 2, 4*D MLP, 16x16 images, patch 4 (4x4 grid, P=16), 10 classes.
SAME = "vim-test-same"  # D=32 like the teacher: E=64 of 128 hidden units, residual kept whole
HALF = "vim-test-half"  # D=16: residual subcloned 16 of 32, E=32 of 128 hidden units


@pytest.fixture(autouse=True)
def tiny_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    register(SAME, VimConfig(embed_dim=32, depth=3, d_state=4))
    register(HALF, VimConfig(embed_dim=16, depth=3, d_state=4))


@pytest.fixture
def teacher_sd() -> dict[str, torch.Tensor]:
    return make_vit_state_dict(SMALL, seed=1)


def _request(src: Path, target: str, out: Path, **kw) -> ConvertRequest:
    return ConvertRequest(source=src, target=target, out=out, num_heads=SMALL.num_heads, **kw)


def _convert(src: Path, target: str, out: Path, **kw) -> tuple[VimConfig, dict[str, torch.Tensor], dict]:
    convert(_request(src, target, out, **kw))
    return load_converted(out)


def _strict_model(cfg: VimConfig, state: dict[str, torch.Tensor]) -> VisionMamba:
    model = VisionMamba(cfg, device="meta")
    model.load_state_dict(state, strict=True, assign=True)
    return model


@pytest.mark.parametrize(
    ("fmt", "container", "naming"),
    [
        ("safetensors", "flat", "timm"),
        ("torch-zip", "deit-train", "timm"),
        ("torch-legacy", "state_dict", "timm"),
        ("hf-dir", "flat", "hf-legacy"),
        ("safetensors-sharded", "flat", "timm"),
    ],
)
def test_every_source_format_converts_to_a_strict_loading_vim(tmp_path, teacher_sd, fmt, container, naming):
    src = write_checkpoint(
        teacher_sd,
        tmp_path / "teacher",
        fmt=fmt,
        container=container,
        naming=naming,
        config=SMALL,
        hf_prefix="vit" if naming == "hf-legacy" else None,
    )
    cfg, state, meta = _convert(src, HALF, tmp_path / "out.safetensors")
    assert (cfg.embed_dim, cfg.depth, cfg.img_size, cfg.patch_size, cfg.num_classes) == (16, 3, (16, 16), 4, 10)
    model = _strict_model(cfg, state)
    assert set(state) == set(VisionMamba(cfg, device="meta").state_dict())
    logits = model(torch.randn(2, 3, 16, 16))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert meta["mapping"] == "vit-vim-mlp" and meta["target"] == HALF
    # the residual channels come from the teacher wherever the mapping copies: same values at the chosen indices
    residual = torch.tensor(meta["index_sets"]["residual"]["indices"]["None"])
    torch.testing.assert_close(state["patch_embed.proj.bias"], teacher_sd["patch_embed.proj.bias"][residual])


def test_same_width_copies_teacher_weights_exactly(tmp_path, teacher_sd):
    src = write_checkpoint(teacher_sd, tmp_path / "t.safetensors")
    _, state, meta = _convert(src, SAME, tmp_path / "out.safetensors")
    assert meta["index_sets"]["residual"]["indices"]["None"] == list(range(32))  # identity selection
    for target, source in [
        ("cls_token", "cls_token"),
        ("patch_embed.proj.weight", "patch_embed.proj.weight"),
        ("patch_embed.proj.bias", "patch_embed.proj.bias"),
        ("norm_f.weight", "norm.weight"),
        ("head.weight", "head.weight"),
        ("head.bias", "head.bias"),
        ("layers.0.norm.weight", "blocks.0.norm2.weight"),
        ("layers.1.norm.weight", "blocks.1.norm2.weight"),
    ]:
        assert torch.equal(state[target], teacher_sd[source]), target
    # in_proj x and z halves: fc1 rows of the 64 kept hidden units (columns untouched, scale 1)
    for layer in (0, 1):
        hidden = torch.tensor(meta["index_sets"]["hidden"]["indices"][str(layer)])
        assert hidden.numel() == 64 and torch.equal(hidden, hidden.sort().values)
        fc1 = teacher_sd[f"blocks.{layer}.mlp.fc1.weight"]
        in_proj = state[f"layers.{layer}.mixer.in_proj.weight"]
        assert torch.equal(in_proj[:64], fc1[hidden]) and torch.equal(in_proj[64:], fc1[hidden])
        # out_proj: fc2 at the same units, times sqrt(128 / 64)
        fc2 = teacher_sd[f"blocks.{layer}.mlp.fc2.weight"]
        torch.testing.assert_close(state[f"layers.{layer}.mixer.out_proj.weight"], fc2[:, hidden] * math.sqrt(2.0))


def test_pos_embed_cls_slot_moves_to_the_middle(tmp_path, teacher_sd):
    src = write_checkpoint(teacher_sd, tmp_path / "t.safetensors")
    cfg, state, _ = _convert(src, SAME, tmp_path / "out.safetensors")
    pos, teacher_pos = state["pos_embed"][0], teacher_sd["pos_embed"][0]  # (17, 32): cls + 16 patches
    middle = cfg.cls_index
    assert middle == 8
    assert torch.equal(pos[middle], teacher_pos[0])  # cls slot
    assert torch.equal(pos[:middle], teacher_pos[1 : 1 + middle])  # patches before it keep their order
    assert torch.equal(pos[middle + 1 :], teacher_pos[1 + middle :])


def test_distilled_source_drops_dist_slot_and_head_dist(tmp_path):
    import dataclasses

    cfg_d = dataclasses.replace(SMALL, distilled=True)
    sd = make_vit_state_dict(cfg_d, seed=2)
    src = write_checkpoint(sd, tmp_path / "d.safetensors")
    prepared = prepare(_request(src, SAME, tmp_path / "o.safetensors"))
    try:
        assert {"dist_token", "head_dist.weight", "head_dist.bias"} <= set(prepared.plan.dropped)
        assert prepared.plan.source_usage()["blocks.0.mlp.fc1.weight"] == pytest.approx(0.5)
    finally:
        prepared.close()
    _, state, _ = _convert(src, SAME, tmp_path / "out.safetensors")
    pos, teacher_pos = state["pos_embed"][0], sd["pos_embed"][0]  # teacher: cls, dist, 16 patches
    assert torch.equal(pos[8], teacher_pos[0]) and torch.equal(pos[:8], teacher_pos[2:10])


def test_shrink_selects_and_rescales(tmp_path, teacher_sd):
    src = write_checkpoint(teacher_sd, tmp_path / "t.safetensors")
    _, state, meta = _convert(src, HALF, tmp_path / "out.safetensors")
    res = torch.tensor(meta["index_sets"]["residual"]["indices"]["None"])
    hidden = torch.tensor(meta["index_sets"]["hidden"]["indices"]["1"])
    assert res.numel() == 16 and hidden.numel() == 32
    fc1 = teacher_sd["blocks.1.mlp.fc1.weight"]
    torch.testing.assert_close(state["layers.1.mixer.in_proj.weight"][:32], fc1[hidden][:, res] * math.sqrt(2.0))
    fc2 = teacher_sd["blocks.1.mlp.fc2.weight"]
    torch.testing.assert_close(state["layers.1.mixer.out_proj.weight"], fc2[res][:, hidden] * math.sqrt(4.0))
    torch.testing.assert_close(state["head.weight"], teacher_sd["head.weight"][:, res] * math.sqrt(2.0))
    assert torch.equal(state["pos_embed"][0, 8], teacher_sd["pos_embed"][0, 0, res])


def test_layer_plan_rest_layers_and_identity_start(tmp_path, teacher_sd):
    src = write_checkpoint(teacher_sd, tmp_path / "t.safetensors")
    cfg, state, meta = _convert(src, SAME, tmp_path / "a.safetensors", seed=3)
    assert meta["layer_plan"] == [{"layer": 0, "block": 0}, {"layer": 1, "block": 1}, {"layer": 2, "block": None}]
    upstream = VisionMamba(cfg, seed=3).state_dict()  # layer 2 and every SSM core: the seeded upstream init
    assert torch.equal(state["layers.2.mixer.out_proj.weight"], upstream["layers.2.mixer.out_proj.weight"])
    assert torch.equal(state["layers.2.mixer.in_proj.weight"], upstream["layers.2.mixer.in_proj.weight"])
    assert torch.equal(state["layers.0.mixer.A_log"], upstream["layers.0.mixer.A_log"])
    assert torch.equal(state["layers.1.mixer.dt_proj_b.bias"], upstream["layers.1.mixer.dt_proj_b.bias"])

    _, ident, _ = _convert(src, SAME, tmp_path / "b.safetensors", seed=3, identity_rest=True)
    assert not ident["layers.2.mixer.out_proj.weight"].any()
    assert torch.equal(ident["layers.2.mixer.in_proj.weight"], upstream["layers.2.mixer.in_proj.weight"])
    assert ident["layers.1.mixer.out_proj.weight"].any()  # inherited layers untouched

    _, _, meta1 = _convert(src, SAME, tmp_path / "c.safetensors", layers=1)
    assert [r["block"] for r in meta1["layer_plan"]] == [0, None, None]


def test_more_layers_than_teacher_blocks_spread_evenly(tmp_path, teacher_sd):
    src = write_checkpoint(teacher_sd, tmp_path / "t.safetensors")
    _, state, meta = _convert(src, SAME, tmp_path / "out.safetensors", layers=3)
    assert [r["block"] for r in meta["layer_plan"]] == [0, 0, 1]
    assert torch.equal(state["layers.1.norm.weight"], teacher_sd["blocks.0.norm2.weight"])
    assert torch.equal(state["layers.2.norm.weight"], teacher_sd["blocks.1.norm2.weight"])


def test_num_classes_override_falls_back_to_default_head(tmp_path, teacher_sd):
    src = write_checkpoint(teacher_sd, tmp_path / "t.safetensors")
    cfg, state, _ = _convert(src, SAME, tmp_path / "out.safetensors", num_classes=7, seed=5)
    assert state["head.weight"].shape == (7, 32)
    assert torch.equal(state["head.weight"], VisionMamba(cfg, seed=5).state_dict()["head.weight"])


def test_image_and_patch_overrides_resample(tmp_path, teacher_sd):
    src = write_checkpoint(teacher_sd, tmp_path / "t.safetensors")
    cfg, state, _ = _convert(src, SAME, tmp_path / "out.safetensors", img_size=24, patch_size=3)
    assert cfg.grid == (8, 8) and state["pos_embed"].shape == (1, 65, 32)
    assert state["patch_embed.proj.weight"].shape == (32, 3, 3, 3)
    _strict_model(cfg, state)(torch.randn(1, 3, 24, 24))


def test_dtype_and_pinned_float32(tmp_path, teacher_sd):
    src = write_checkpoint(teacher_sd, tmp_path / "t.safetensors")
    _, state, _ = _convert(src, HALF, tmp_path / "out.safetensors", dtype="bf16")
    assert state["layers.0.mixer.in_proj.weight"].dtype == torch.bfloat16
    assert state["layers.2.mixer.dt_proj.weight"].dtype == torch.bfloat16
    assert state["layers.0.mixer.A_log"].dtype == torch.float32 and state["layers.2.mixer.D_b"].dtype == torch.float32


def test_attn_mapping_fills_value_channels_and_zeros(tmp_path, teacher_sd):
    src = write_checkpoint(teacher_sd, tmp_path / "t.safetensors")
    cfg, state, meta = _convert(src, SAME, tmp_path / "out.safetensors", mapping="vit-vim-attn", seed=4)
    value = meta["index_sets"]["value"]["indices"]["0"]
    assert value == list(range(32))  # E=64 > D=32: every value channel, then 32 rows from the init
    v_rows = teacher_sd["blocks.0.attn.qkv.weight"][64:96]
    in_proj = state["layers.0.mixer.in_proj.weight"]
    assert torch.equal(in_proj[:32], v_rows)
    upstream = VisionMamba(cfg, seed=4).state_dict()
    assert torch.equal(in_proj[32:64], upstream["layers.0.mixer.in_proj.weight"][32:64])
    out_proj = state["layers.0.mixer.out_proj.weight"]
    assert torch.equal(out_proj[:, :32], teacher_sd["blocks.0.attn.proj.weight"]) and not out_proj[:, 32:].any()
    assert torch.equal(state["layers.0.norm.weight"], teacher_sd["blocks.0.norm1.weight"])


def test_activation_scores_with_synthetic_calibration(tmp_path, teacher_sd):
    src = write_checkpoint(teacher_sd, tmp_path / "t.safetensors")
    _, _, meta_a = _convert(src, HALF, tmp_path / "a.safetensors", calib="4")
    _, _, meta_m = _convert(src, HALF, tmp_path / "m.safetensors")
    _, _, meta_u = _convert(src, HALF, tmp_path / "u.safetensors", score="uniform")
    assert meta_a["options"]["score"] == "activation" and meta_m["options"]["score"] == "magnitude"
    assert meta_u["index_sets"]["residual"]["indices"]["None"] == list(range(0, 32, 2))
    assert meta_a["index_sets"]["hidden"] != meta_m["index_sets"]["hidden"]  # different signals, different picks


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_inputs_and_seed_give_byte_identical_outputs(tmp_path, teacher_sd):
    src = write_checkpoint(teacher_sd, tmp_path / "t.pth", fmt="torch-zip")
    digests = []
    for run in ("a", "b"):
        folder = tmp_path / run
        folder.mkdir()
        convert(_request(src, HALF, folder / "vim.safetensors", format="vim", calib="3"))
        digests.append([_digest(folder / n) for n in ("vim.safetensors", "vim.config.json", "vim.pth")])
    assert digests[0] == digests[1]
    convert(_request(src, HALF, tmp_path / "seed9.safetensors", seed=9))
    assert _digest(tmp_path / "seed9.safetensors") != digests[0][0]


def test_metadata_sidecar_and_upstream_pth(tmp_path, teacher_sd):
    src = write_checkpoint(teacher_sd, tmp_path / "t.safetensors")
    out = tmp_path / "vim.safetensors"
    result = convert(_request(src, HALF, out, format="vim"))
    meta = read_metadata(out)
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert meta["mapping_sha256"] == result.plan.mapping.sha256 and meta["seed"] == 0
    assert meta["target_config"]["embed_dim"] == 16
    sidecar = json.loads((tmp_path / "vim.config.json").read_text())
    assert sidecar["target_config"] == meta["target_config"] and sidecar["layer_plan"] == meta["layer_plan"]
    pth = torch.load(tmp_path / "vim.pth", map_location="cpu", weights_only=True)
    cfg = VimConfig(**meta["target_config"])
    model = VisionMamba(cfg, device="meta")
    model.load_state_dict(pth["model"], strict=True, assign=True)
    assert list(pth["model"]) == list(VisionMamba(cfg, device="meta").state_dict())  # upstream key order
    with safe_open(str(out), framework="pt") as handle:
        assert torch.equal(handle.get_tensor("cls_token"), pth["model"]["cls_token"])
    structural = {k: v for k, v in result.verification.items() if k != "numeric"}
    assert structural == {"keys": len(pth["model"]), "strict_load": True, "pth_keys": len(pth["model"])}
    numeric = result.verification["numeric"]
    assert numeric["ok"] and numeric["finite"] and len(numeric["layers"]) == cfg.depth


def test_wider_student_is_one_problem_at_the_index_set(tmp_path, teacher_sd):
    """The residual set cannot keep 64 of 32 channels; the rules that select with it add no follow-on errors."""
    register("vim-test-wide", VimConfig(embed_dim=64, depth=3, d_state=4))
    src = write_checkpoint(teacher_sd, tmp_path / "t.safetensors")
    out = tmp_path / "out.safetensors"
    with pytest.raises(MappingError) as info:
        convert(_request(src, "vim-test-wide", out))
    lines = str(info.value).splitlines()[1:]
    assert len(lines) == 1, lines
    assert "index_sets.residual: keeps 64" in lines[0] and "student wider than the teacher" in lines[0]
    assert not out.exists()
