"""The named-config registry: lookups, families, building with overrides, and its errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tmconvert.models import (
    ModelConfigError,
    VimConfig,
    VisionMamba,
    VisionTransformer,
    ViTConfig,
    build_model,
    families,
    family_of,
    get_config,
    list_models,
    register,
)
from tmconvert.models import registry as registry_module


def test_builtin_names_and_families() -> None:
    vit = list_models("vit")
    vim = list_models("vim")
    assert {"deit-t", "deit-s", "deit-b", "deit-t-distilled", "deit-s-distilled", "deit-b-distilled"} <= set(vit)
    assert {"vim-t", "vim-s", "vim-b", "vim-t-stride8", "vim-s-stride8"} <= set(vim)
    plain, video, vmamba = list_models("plainmamba"), list_models("videomamba"), list_models("vmamba")
    assert plain == ["plainmamba-l1", "plainmamba-l2", "plainmamba-l3"]
    assert video == ["videomamba-m", "videomamba-s", "videomamba-ti"]
    assert vmamba == ["vmamba-b", "vmamba-s", "vmamba-t"]
    assert families() == ["plainmamba", "videomamba", "vim", "vit", "vmamba"]
    assert list_models() == sorted(vit + vim + plain + video + vmamba)
    assert all(isinstance(get_config(n), ViTConfig) for n in vit)
    assert all(isinstance(get_config(n), VimConfig) for n in vim)
    assert family_of(get_config("vim-b")) == "vim"


@pytest.mark.parametrize(
    ("name", "dims"),
    [
        ("deit-t", (192, 3, 768)),
        ("deit-s", (384, 6, 1536)),
        ("deit-b", (768, 12, 3072)),
    ],
)
def test_deit_configs(name: str, dims: tuple[int, int, int]) -> None:
    cfg = get_config(name)
    assert (cfg.embed_dim, cfg.num_heads, cfg.mlp_hidden) == dims
    assert (cfg.depth, cfg.patch_size, cfg.img_size, cfg.norm_eps, cfg.num_classes) == (12, 16, (224, 224), 1e-6, 1000)
    assert not cfg.distilled and get_config(f"{name}-distilled").distilled


@pytest.mark.parametrize(("name", "dim"), [("vim-t", 192), ("vim-s", 384), ("vim-b", 768)])
def test_vim_configs(name: str, dim: int) -> None:
    cfg = get_config(name)
    assert (cfg.embed_dim, cfg.depth, cfg.patch_size, cfg.img_size, cfg.num_classes) == (dim, 24, 16, (224, 224), 1000)
    assert (cfg.d_state, cfg.expand, cfg.d_conv, cfg.resolved_dt_rank) == (16, 2, 4, dim // 16)
    assert (cfg.cls_position, cfg.cls_index, cfg.seq_len, cfg.divide_out) == ("middle", 98, 197, True)
    assert (cfg.norm_eps, cfg.residual_in_fp32, cfg.drop_path_rate) == (1e-5, True, 0.0)


def test_unknown_name_lists_known_models() -> None:
    with pytest.raises(ModelConfigError, match=r"unknown model 'vim-xl'; known models: .*deit-t.*vim-t"):
        get_config("vim-xl")
    with pytest.raises(ModelConfigError, match="unknown model family 'mamba2'"):
        list_models("mamba2")


def test_build_model_dispatches_on_config_type() -> None:
    assert isinstance(build_model("deit-t", device="meta"), VisionTransformer)
    assert isinstance(build_model("vim-t", device="meta"), VisionMamba)
    custom = VimConfig(embed_dim=16, depth=1, img_size=(16, 16), patch_size=8, num_classes=3)
    model = build_model(custom, seed=0)
    assert isinstance(model, VisionMamba) and model.cfg == custom
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 3)


def test_build_model_overrides_and_seed() -> None:
    model = build_model("vim-t", depth=2, num_classes=10, img_size=32, seed=3)
    assert model.cfg == dataclasses.replace(get_config("vim-t"), depth=2, num_classes=10, img_size=(32, 32))
    assert len(model.layers) == 2 and model.head.weight.shape == (10, 192)
    again = build_model("vim-t", depth=2, num_classes=10, img_size=32, seed=3)
    assert torch.equal(model.layers[1].mixer.dt_proj_b.bias, again.layers[1].mixer.dt_proj_b.bias)
    wider = build_model("vim-t", embed_dim=64, depth=1, device="meta")
    assert wider.layers[0].mixer.dt_proj.weight.shape == (128, 4)  # dt_rank stays "auto" under overrides
    teacher = build_model("deit-t", depth=1, num_classes=0, dtype=torch.float64, seed=0)
    assert teacher.pos_embed.dtype == torch.float64 and len(teacher.blocks) == 1
    assert get_config("vim-t").depth == 24  # the registered config is untouched


def test_build_model_rejects_unknown_fields() -> None:
    with pytest.raises(ModelConfigError, match=r"unknown VimConfig field.*num_heads"):
        build_model("vim-t", num_heads=3)


def test_register_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    register("vim-tiny-test", VimConfig(embed_dim=32, depth=2))
    assert get_config("vim-tiny-test").embed_dim == 32 and "vim-tiny-test" in list_models("vim")
    with pytest.raises(ModelConfigError, match="already registered"):
        register("vim-t", VimConfig())
    with pytest.raises(ModelConfigError, match="not a known model config type"):
        register("bad", {"embed_dim": 3})
