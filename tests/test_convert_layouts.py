"""Every teacher layout converts with the shipped mappings: LayerScale (folded), no cls position, registers, CLIP's
pre-norm and bias-free patch embedding, average pooling; each result loads strictly and runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tests._ckpt_factory import SMALL, make_vit_state_dict, write_checkpoint
from tmconvert.converter.cli import main
from tmconvert.converter.convert.engine import ConvertRequest, convert
from tmconvert.converter.modelfile.converted import load_converted
from tmconvert.models import VisionMamba, ViTConfig, build_model, resample_abs_pos_embed
from tmconvert.models import registry as registry_module
from tmconvert.models.registry import register
from tmconvert.models.vim import VimConfig

HALF = "vim-test-layouts"  # D=16 from SMALL's D=32: the residual stream and the hidden units are subcloned
MAPPINGS = ("vit-vim-mlp", "vit-vim-attn")


@pytest.fixture(autouse=True)
def tiny_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    register(HALF, VimConfig(embed_dim=16, depth=3, d_state=4))


def _convert(sd: dict[str, torch.Tensor], cfg: ViTConfig, folder: Path, name: str, **kw):
    src = write_checkpoint(sd, folder / f"{name}.safetensors")
    out = folder / f"{name}-out.safetensors"
    convert(ConvertRequest(source=src, target=HALF, out=out, num_heads=cfg.num_heads, **kw))
    return load_converted(out)


def _with_layerscale(cfg: ViTConfig, seed: int) -> dict[str, torch.Tensor]:
    sd = make_vit_state_dict(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for name in sd:
        if name.endswith(".gamma"):  # far from 1, different per channel: a fold that is skipped cannot pass
            sd[name] = torch.rand(sd[name].shape, generator=gen) * 2 + 0.1
    return sd


def _folded(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """The same network without LayerScale: each gamma multiplied into the projection it scales."""
    out = {k: v.clone() for k, v in sd.items() if not k.endswith(".gamma")}
    for b in range(depth):
        for gamma, linear in (("ls1", "attn.proj"), ("ls2", "mlp.fc2")):
            g = sd[f"blocks.{b}.{gamma}.gamma"]
            out[f"blocks.{b}.{linear}.weight"] = g[:, None] * sd[f"blocks.{b}.{linear}.weight"]
            out[f"blocks.{b}.{linear}.bias"] = g * sd[f"blocks.{b}.{linear}.bias"]
    return out


@pytest.mark.parametrize("mapping", MAPPINGS)
@pytest.mark.parametrize("score", ["magnitude", "uniform"])
def test_layerscale_converts_like_the_network_with_gammas_folded_in(tmp_path, mapping, score):
    layer_scale = dataclasses.replace(SMALL, layer_scale=True)
    sd = _with_layerscale(layer_scale, seed=3)
    _, ours, _ = _convert(sd, layer_scale, tmp_path, "ls", mapping=mapping, score=score)
    _, reference, _ = _convert(_folded(sd, SMALL.depth), SMALL, tmp_path, "folded", mapping=mapping, score=score)
    assert list(ours) == list(reference)
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-6, atol=1e-7, msg=name)
    # and the fold is not a no-op: the gammas reached out_proj
    _, unfolded, _ = _convert(make_vit_state_dict(SMALL, seed=3), SMALL, tmp_path, "plain", mapping=mapping)
    assert not torch.allclose(ours["layers.0.mixer.out_proj.weight"], unfolded["layers.0.mixer.out_proj.weight"])


LAYOUTS = {
    "deit3": dataclasses.replace(SMALL, layer_scale=True, no_embed_class=True),
    "dinov2": dataclasses.replace(SMALL, layer_scale=True, num_classes=0),
    "dinov2-reg-timm": dataclasses.replace(SMALL, layer_scale=True, reg_tokens=4, no_embed_class=True, num_classes=0),
    "dinov2-reg-original": dataclasses.replace(SMALL, layer_scale=True, reg_tokens=4, num_classes=0),
    "clip": dataclasses.replace(SMALL, pre_norm=True, patch_bias=False, act="quick_gelu", norm_eps=1e-5, num_classes=0),
    "avg-pool-fc-norm": dataclasses.replace(SMALL, class_token=False, global_pool="avg", fc_norm=True),
    "avg-pool-norm": dataclasses.replace(SMALL, class_token=False, global_pool="avg"),
}


@pytest.mark.parametrize("mapping", MAPPINGS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_converts_loads_strictly_and_runs(tmp_path, layout, mapping):
    cfg = LAYOUTS[layout]
    sd = make_vit_state_dict(cfg, seed=5)
    teacher = build_model(cfg, device="meta")
    teacher.load_state_dict(sd, strict=True, assign=True)  # the checkpoint is a complete teacher of this layout
    target_cfg, state, metadata = _convert(sd, cfg, tmp_path, layout, mapping=mapping, calib="4")
    assert (target_cfg.cls_position == "none") == (not cfg.class_token)
    student = VisionMamba(target_cfg, device="meta")
    student.load_state_dict(state, strict=True, assign=True)
    logits = student.float().eval()(torch.randn(2, 3, *cfg.img_size))
    assert logits.shape == (2, target_cfg.num_classes or 16) and torch.isfinite(logits).all()  # headless: features
    if cfg.class_token:  # ViM's cls slot: the teacher's, or a zero slot where the teacher folded it into the token
        pos = state["pos_embed"][0, target_cfg.cls_index]
        channels = torch.tensor(metadata["index_sets"]["residual"]["indices"]["None"])
        expected = torch.zeros(16) if cfg.no_embed_class else sd["pos_embed"][0, 0, channels]
        torch.testing.assert_close(pos, expected)
    if not cfg.patch_bias:
        assert not state["patch_embed.proj.bias"].any()  # CLIP: no bias is a zero bias
    assert metadata["source_config"]["reg_tokens"] == cfg.reg_tokens


def test_a_position_grid_of_any_size_is_resampled_to_the_students(tmp_path):
    """DINOv2's 37x37 grid at 518 px becomes the 16x16 grid of a 224-px student (patch 14): timm's resampling."""
    cfg = dataclasses.replace(SMALL, depth=1, patch_size=14, img_size=(518, 518), layer_scale=True, num_classes=0)
    sd = make_vit_state_dict(cfg, seed=2)
    target_cfg, state, metadata = _convert(sd, cfg, tmp_path, "dinov2-518", img_size=224)
    assert target_cfg.grid == (16, 16) and state["pos_embed"].shape == (1, 16 * 16 + 1, 16)
    channels = torch.tensor(metadata["index_sets"]["residual"]["indices"]["None"])
    grid = resample_abs_pos_embed(sd["pos_embed"], (16, 16), (37, 37), num_prefix_tokens=1)[0, 1:]
    patches = torch.cat(
        [state["pos_embed"][0, : target_cfg.cls_index], state["pos_embed"][0, target_cfg.cls_index + 1 :]]
    )
    torch.testing.assert_close(patches, grid[:, channels])


@pytest.mark.parametrize(
    "cfg",
    [
        dataclasses.replace(SMALL, layer_scale=True, reg_tokens=2, no_embed_class=True),
        dataclasses.replace(SMALL, class_token=False, global_pool="avg", fc_norm=True),
    ],
    ids=["dinov2-reg", "avg-pool"],
)
def test_new_layouts_distil_and_evaluate(tmp_path, capsys, cfg):
    """The teacher forward runs for distillation and `eval`; a student without a cls token aligns its patches."""
    teacher = write_checkpoint(make_vit_state_dict(cfg, seed=4), tmp_path / "teacher.safetensors")
    student = tmp_path / "student.safetensors"
    convert(ConvertRequest(source=teacher, target=HALF, out=student, num_heads=cfg.num_heads))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("recipe: 1\nsteps: 2\nbatch_size: 4\ndata:\n  workers: 0\n")
    run = tmp_path / "run"
    args = ["distill", str(teacher), str(student), "--data", "synthetic:8", "--out", str(run), "--recipe", str(recipe)]
    assert main([*args, "--device", "cpu", "--heads", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["finished"]
    assert main(["eval", str(teacher), "--data", "synthetic:8", "--heads", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 8
