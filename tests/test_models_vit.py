"""The ViT teacher against timm (the oracle): same keys, same outputs, every config feature the readers detect."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from tests._timm import import_timm, timm_vit
from tmconvert.models import ModelConfigError, VisionTransformer, ViTConfig, build_model, resample_abs_pos_embed

TOL = {"atol": 1e-5, "rtol": 1e-5}


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (timm's init leaves biases zero and LayerScale tiny, which hides bugs)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen) * 0.1
        p.copy_(noise + 1.0 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else noise * 2)


def paired(cfg: ViTConfig, seed: int = 0) -> tuple[nn.Module, VisionTransformer]:
    """A randomised timm model and ours loaded from its state dict with strict=True."""
    reference = timm_vit(cfg, seed=seed)
    randomize_(reference, seed)
    ours = VisionTransformer(cfg).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def images(cfg: ViTConfig, batch: int = 2, size: tuple[int, int] | None = None) -> torch.Tensor:
    return torch.randn(batch, cfg.in_chans, *(size or cfg.img_size), generator=torch.Generator().manual_seed(1))


CASES = {
    # full-width, full-depth DeiT-T block stack at a small image (2x2 grid)
    "deit-t-full-stack": ViTConfig(embed_dim=192, depth=12, num_heads=3, mlp_hidden=768, img_size=(32, 32)),
    "deit-s-shaped": ViTConfig(embed_dim=384, depth=2, num_heads=6, mlp_hidden=1536, img_size=(48, 48)),
    "deit-distilled": ViTConfig(embed_dim=64, depth=2, num_heads=2, mlp_hidden=256, img_size=(48, 48), distilled=True),
    "layerscale-p14-no-embed-class-no-qkv-bias": ViTConfig(
        embed_dim=96,
        depth=2,
        num_heads=3,
        mlp_hidden=384,
        patch_size=14,
        img_size=(56, 56),
        layer_scale=True,
        no_embed_class=True,
        qkv_bias=False,
        norm_eps=1e-5,
    ),
    "headless-hf-eps": ViTConfig(
        embed_dim=64, depth=2, num_heads=4, mlp_hidden=128, img_size=(32, 48), num_classes=0, norm_eps=1e-12
    ),
    "avg-pool-fc-norm": ViTConfig(
        embed_dim=64, depth=2, num_heads=2, mlp_hidden=256, img_size=(32, 32), global_pool="avg", fc_norm=True
    ),
    "avg-pool-no-cls": ViTConfig(
        embed_dim=64,
        depth=2,
        num_heads=2,
        mlp_hidden=256,
        img_size=(32, 32),
        class_token=False,
        global_pool="avg",
        fc_norm=True,
    ),
    # vit_small_patch14_dinov2 (LayerScale; mask_token is not part of the forward) at a 4x4 grid
    "dinov2": ViTConfig(
        embed_dim=96,
        depth=2,
        num_heads=3,
        mlp_hidden=384,
        patch_size=14,
        img_size=(56, 56),
        layer_scale=True,
        num_classes=0,
    ),
    # vit_small_patch14_reg4_dinov2: registers after cls, no position for cls or registers
    "dinov2-reg-timm": ViTConfig(
        embed_dim=96,
        depth=2,
        num_heads=3,
        mlp_hidden=384,
        patch_size=14,
        img_size=(56, 56),
        layer_scale=True,
        reg_tokens=4,
        no_embed_class=True,
        num_classes=0,
    ),
    # deit3_small_patch16_224: LayerScale, position embedding without the cls slot
    "deit3": ViTConfig(
        embed_dim=96, depth=2, num_heads=3, mlp_hidden=384, img_size=(32, 32), layer_scale=True, no_embed_class=True
    ),
    # vit_base_patch16_clip_quickgelu_224 (OpenAI CLIP image tower): ln_pre, no patch bias, QuickGELU, eps 1e-5
    "clip-quickgelu": ViTConfig(
        embed_dim=64,
        depth=2,
        num_heads=2,
        mlp_hidden=256,
        img_size=(32, 32),
        pre_norm=True,
        patch_bias=False,
        act="quick_gelu",
        norm_eps=1e-5,
        num_classes=0,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_timm(case: str) -> None:
    cfg = CASES[case]
    reference, ours = paired(cfg)
    assert list(ours.state_dict()) == list(reference.state_dict())
    x = images(cfg)
    with torch.no_grad():
        expected = reference(x)
        out = ours.forward_all(x)
        plain = ours(x)
        expected_tokens = reference.forward_features(x)
    torch.testing.assert_close(out.logits, expected, **TOL)
    torch.testing.assert_close(plain, expected, **TOL)
    if not cfg.fc_norm:
        torch.testing.assert_close(out.final_tokens, expected_tokens, **TOL)
    assert out.logits.shape == (2, cfg.num_classes or cfg.embed_dim)
    assert out.final_tokens.shape == (2, cfg.seq_len, cfg.embed_dim)


def test_state_dict_is_timm_deit_tiny() -> None:
    """Exactly timm's deit_tiny_patch16_224 keys and shapes, and its parameter count."""
    timm = import_timm()
    reference = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    ours = build_model("deit-t", device="meta")
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 5_717_416
    distilled = build_model("deit-s-distilled", device="meta")
    assert sum(p.numel() for p in distilled.parameters()) == 22_436_432
    assert distilled.state_dict()["pos_embed"].shape == (1, 198, 384)


def test_forward_all_exposes_every_block_and_qkv() -> None:
    """Block outputs and q/k/v equal timm's, computed by walking timm's blocks by hand."""
    cfg = CASES["deit-distilled"]
    reference, ours = paired(cfg, seed=3)
    x = images(cfg)
    with torch.no_grad():
        out = ours.forward_all(x, return_qkv=True)
        tokens = reference._pos_embed(reference.patch_embed(x))
        for i, block in enumerate(reference.blocks):
            b, t, _ = tokens.shape
            qkv = block.attn.qkv(block.norm1(tokens)).reshape(b, t, 3, cfg.num_heads, cfg.head_dim)
            expected_q, expected_k, expected_v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            tokens = block(tokens)
            torch.testing.assert_close(out.layer_tokens[i], tokens, **TOL)
            q, k, v = out.qkv[i]
            torch.testing.assert_close(q, expected_q, **TOL)
            torch.testing.assert_close(k, expected_k, **TOL)
            torch.testing.assert_close(v, expected_v, **TOL)
    assert len(out.layer_tokens) == cfg.depth and len(out.qkv) == cfg.depth
    assert out.qkv[0][0].shape == (2, cfg.num_heads, cfg.seq_len, cfg.head_dim)
    assert ours.forward_all(x).qkv is None


def test_distilled_head_averages_cls_and_dist_heads() -> None:
    cfg = CASES["deit-distilled"]
    _, ours = paired(cfg, seed=5)
    with torch.no_grad():
        out = ours.forward_all(images(cfg))
        tokens = out.final_tokens
        expected = (ours.head(tokens[:, 0]) + ours.head_dist(tokens[:, 1])) / 2
    torch.testing.assert_close(out.logits, expected)
    assert not torch.allclose(ours.head(tokens[:, 0]), ours.head_dist(tokens[:, 1]))


def test_other_image_size_resamples_pos_embed_like_timm() -> None:
    """An image on another grid gets timm's dynamic_img_size behaviour (bicubic + antialias resample)."""
    timm = import_timm()
    cfg = ViTConfig(embed_dim=64, depth=2, num_heads=2, mlp_hidden=128, img_size=(64, 64), distilled=True)
    reference = timm.create_model(
        "deit_tiny_distilled_patch16_224",
        pretrained=False,
        img_size=64,
        embed_dim=64,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        dynamic_img_size=True,
    ).eval()
    randomize_(reference, 7)
    ours = VisionTransformer(cfg).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = images(cfg, size=(96, 48))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), **TOL)


@pytest.mark.parametrize(("prefix", "old", "new"), [(1, (14, 14), (7, 9)), (2, (4, 4), (6, 6)), (0, (3, 5), (5, 3))])
def test_resample_abs_pos_embed_equals_timm(prefix: int, old: tuple[int, int], new: tuple[int, int]) -> None:
    import_timm()
    from timm.layers import resample_abs_pos_embed as timm_resample

    pos = torch.randn(1, prefix + old[0] * old[1], 8, generator=torch.Generator().manual_seed(0))
    ours = resample_abs_pos_embed(pos, new, old, num_prefix_tokens=prefix)
    assert ours.shape == (1, prefix + new[0] * new[1], 8)
    torch.testing.assert_close(ours, timm_resample(pos, list(new), list(old), num_prefix_tokens=prefix))
    torch.testing.assert_close(ours[:, :prefix], pos[:, :prefix])  # prefix tokens untouched
    assert resample_abs_pos_embed(pos, old, old, num_prefix_tokens=prefix) is pos


def test_resample_abs_pos_embed_rejects_a_non_grid() -> None:
    with pytest.raises(ModelConfigError, match="not a square grid"):
        resample_abs_pos_embed(torch.zeros(1, 1 + 15, 4), (4, 4))
    with pytest.raises(ModelConfigError, match="expected 3x3"):
        resample_abs_pos_embed(torch.zeros(1, 1 + 16, 4), (4, 4), (3, 3))


def test_token_layout() -> None:
    layout = ViTConfig(img_size=(32, 48), distilled=True).token_layout()
    assert (layout.cls_index, layout.dist_index, layout.grid) == (0, 1, (2, 3))
    assert layout.patch_indices == (2, 3, 4, 5, 6, 7)
    assert layout.seq_len == 8


def test_seeded_init_is_reproducible() -> None:
    cfg = ViTConfig(embed_dim=32, depth=1, num_heads=2, mlp_hidden=64, img_size=(32, 32))
    a, b, c = VisionTransformer(cfg, seed=1), VisionTransformer(cfg, seed=1), VisionTransformer(cfg, seed=2)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(value, b.state_dict()[key], rtol=0, atol=0)
    assert not torch.equal(a.pos_embed, c.pos_embed)


def test_invalid_configs_raise_config_error() -> None:
    with pytest.raises(ModelConfigError, match="divisible"):
        ViTConfig(embed_dim=100, num_heads=3)
    with pytest.raises(ModelConfigError, match="class_token"):
        ViTConfig(class_token=False)
    with pytest.raises(ModelConfigError, match="distilled"):
        ViTConfig(distilled=True, no_embed_class=True)


def test_dinov2_original_register_layout_equals_timms_conversion() -> None:
    """DINOv2's own layout (pos_embed over cls and patches, `register_tokens` without a position) is read as is
    (`no_embed_class=False` + registers); timm folds cls's position into the token instead. Same function."""
    import_timm()
    from timm.models.vision_transformer import _convert_dinov2

    original = dataclasses.replace(CASES["dinov2-reg-timm"], no_embed_class=False)
    ours = VisionTransformer(original).eval()
    randomize_(ours, seed=7)
    state = {("register_tokens" if k == "reg_token" else k): v for k, v in ours.state_dict().items()}
    assert state["pos_embed"].shape == (1, 1 + original.num_patches, original.embed_dim)
    reference = timm_vit(CASES["dinov2-reg-timm"])
    reference.load_state_dict(_convert_dinov2({**state, "mask_token": torch.zeros(1, 96)}, reference), strict=True)
    x = images(original)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), **TOL)
        torch.testing.assert_close(ours.forward_all(x).final_tokens, reference.forward_features(x), **TOL)
