"""Every widely used pretrained ViT layout, from timm and from Hugging Face names: the detected config and layout,
canonical tensors equal to timm's (its model, or what its `checkpoint_filter_fn` makes of the upstream format), and
tmconvert's `VisionTransformer` loading them strictly and computing what the timm model computes.

Models are timm's registered architectures made tiny (width 32, depth 2); the upstream key layouts are written by
tests/_ckpt_factory.py, independently of the reader's name table."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tests._ckpt_factory import make_vit_state_dict, write_checkpoint
from tests._timm import import_timm, timm_vit
from tmconvert.converter.checkpoint import Checkpoint, open_checkpoint
from tmconvert.models import VisionTransformer
from tmconvert.models.vit import ViTConfig

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}
TINY_CONFIG = ViTConfig(embed_dim=32, depth=2, num_heads=2, mlp_hidden=128, num_classes=0)  # fields timm's share
DINOV2 = dataclasses.replace(TINY_CONFIG, patch_size=14, img_size=(28, 28), layer_scale=True)
DINOV2_REG = dataclasses.replace(DINOV2, reg_tokens=4, no_embed_class=True)  # timm's form
CLIP = dataclasses.replace(
    TINY_CONFIG, patch_size=16, img_size=(32, 32), pre_norm=True, patch_bias=False, act="quick_gelu", norm_eps=1e-5
)


def timm_model(name: str, seed: int = 0, **kwargs: object) -> torch.nn.Module:
    """timm's registered `name`, tiny, with every parameter random (timm zero-inits some) so all are told apart."""
    timm = import_timm()
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **TINY, **kwargs)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model.eval()


def filter_fn(state_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm's own conversion of an upstream (OpenAI CLIP, facebookresearch DINOv2) state dict."""
    import_timm()
    from timm.models.vision_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(dict(state_dict), model)


def assert_tensors(ckpt: Checkpoint, expected: dict[str, torch.Tensor]) -> None:
    """The canonical tensors are exactly `expected` (names, shapes, values), in timm's order."""
    assert ckpt.names() == [name for name in expected if name in ckpt]
    assert sorted(ckpt.names()) == sorted(expected)
    for name, tensor in expected.items():
        got = ckpt.get(name)
        assert got.shape == tensor.shape and torch.equal(got, tensor), name


def assert_computes_like(ckpt: Checkpoint, reference: torch.nn.Module) -> None:
    """tmconvert's ViT, built from the detected config, loads the canonical tensors strictly and matches `reference`."""
    cfg = ckpt.config
    model = VisionTransformer(cfg).eval()
    model.load_state_dict(ckpt.state_dict(), strict=True)
    images = torch.randn(2, cfg.in_chans, *cfg.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images))


# DINOv2 ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "naming", "expected", "layout"),
    [
        ("vit_small_patch14_dinov2", "timm", DINOV2, "dinov2"),
        ("vit_small_patch14_dinov2", "dinov2-fb", DINOV2, "dinov2"),  # facebookresearch hub file: + mask_token
        ("vit_small_patch14_reg4_dinov2", "timm", DINOV2_REG, "dinov2-reg"),
    ],
)
def test_timm_dinov2(tmp_path: Path, name: str, naming: str, expected: ViTConfig, layout: str) -> None:
    model = timm_model(name, img_size=28, num_classes=0)
    reference = model.state_dict()
    path = write_checkpoint(reference, tmp_path / "dinov2.pth", fmt="torch-zip", naming=naming)
    with open_checkpoint(path, num_heads=2) as ckpt:
        assert ckpt.config == expected and ckpt.layout == layout and ckpt.naming == "timm"
        assert [info.name for info in ckpt.ignored] == (["mask_token"] if naming == "dinov2-fb" else [])
        assert_tensors(ckpt, reference)
        assert_computes_like(ckpt, model)


def _facebook_registers(timm_reg_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The facebookresearch form of timm's register model: pos_embed with a cls slot that timm folds into cls_token."""
    reference = timm_reg_model.state_dict()
    cls_pos = torch.randn(1, 1, reference["pos_embed"].shape[-1], generator=torch.Generator().manual_seed(5))
    upstream = {
        "cls_token": reference["cls_token"] - cls_pos,
        "reg_token": reference["reg_token"],
        "pos_embed": torch.cat([cls_pos, reference["pos_embed"]], dim=1),
    }
    return {**upstream, **{k: v for k, v in reference.items() if k not in upstream}}


def test_facebookresearch_dinov2_with_registers_keeps_its_cls_position(tmp_path: Path) -> None:
    """Registers and the cls slot of pos_embed map onto tmconvert's config without changing any value; the model
    computes what timm computes after its checkpoint_filter_fn folded the cls position into cls_token."""
    model = timm_model("vit_small_patch14_reg4_dinov2", img_size=28, num_classes=0)
    canonical = _facebook_registers(model)
    path = write_checkpoint(canonical, tmp_path / "dinov2_vits14_reg4.pth", fmt="torch-zip", naming="dinov2-fb")
    stored = torch.load(path, weights_only=True)
    assert "register_tokens" in stored and "mask_token" in stored
    timm_view = filter_fn(stored, model)
    assert timm_view.keys() == model.state_dict().keys()
    assert all(torch.allclose(timm_view[k], v) for k, v in model.state_dict().items())  # the factory is upstream's
    with open_checkpoint(path, num_heads=2) as ckpt:
        assert ckpt.config == dataclasses.replace(DINOV2, reg_tokens=4) and ckpt.layout == "dinov2-reg"
        assert ckpt.source_names("reg_token") == ("register_tokens",)
        assert_tensors(ckpt, {k: canonical[k] for k in model.state_dict()})  # values unchanged, timm's order
        assert_computes_like(ckpt, model)


@pytest.mark.parametrize("naming", ["hf-dinov2", "hf-dinov2-v5"])
@pytest.mark.parametrize("hf_prefix", ["", "dinov2"])
def test_hf_dinov2(tmp_path: Path, naming: str, hf_prefix: str) -> None:
    model = timm_model("vit_small_patch14_dinov2", img_size=28, num_classes=0)
    reference = model.state_dict()
    path = write_checkpoint(
        reference, tmp_path / "hf", fmt="hf-dir", naming=naming, hf_prefix=hf_prefix, config=DINOV2, layer_norm_eps=1e-6
    )
    with open_checkpoint(path) as ckpt:
        assert ckpt.config == DINOV2 and ckpt.layout == "dinov2"
        assert ckpt.naming == ("hf-legacy" if naming == "hf-dinov2" else "hf-v5")
        assert ckpt.notes == ()  # heads, grid, eps all from config.json (MLP width from mlp_ratio)
        base = f"{hf_prefix}." if hf_prefix else ""
        assert [info.name for info in ckpt.ignored] == [f"{base}embeddings.mask_token"]
        q, k, v = ("q_proj", "k_proj", "v_proj") if naming.endswith("v5") else ("query", "key", "value")
        attention = "attention" if naming.endswith("v5") else "attention.attention"
        assert ckpt.source_names("blocks.1.attn.qkv.weight") == tuple(
            f"{base}encoder.layer.1.{attention}.{part}.weight" for part in (q, k, v)
        )
        assert ckpt.source_names("blocks.1.ls2.gamma") == (f"{base}encoder.layer.1.layer_scale2.lambda1",)
        assert_tensors(ckpt, reference)
        assert_computes_like(ckpt, model)


def test_hf_dinov2_without_config_json_uses_dinov2s_norm_eps(tmp_path: Path) -> None:
    reference = timm_model("vit_small_patch14_dinov2", img_size=28, num_classes=0).state_dict()
    path = write_checkpoint(reference, tmp_path / "model.safetensors", naming="hf-dinov2")
    with open_checkpoint(path, num_heads=2) as ckpt:
        assert ckpt.config == DINOV2
        assert "norm eps 1e-06: transformers' Dinov2Config default (no config.json gives layer_norm_eps)" in ckpt.notes


@pytest.mark.parametrize("naming", ["hf-dinov2", "hf-dinov2-v5"])
def test_hf_dinov2_with_registers(tmp_path: Path, naming: str) -> None:
    model = timm_model("vit_small_patch14_reg4_dinov2", img_size=28, num_classes=0)
    canonical = _facebook_registers(model)
    expected = dataclasses.replace(DINOV2, reg_tokens=4)
    path = write_checkpoint(
        canonical, tmp_path / "hf", fmt="hf-dir-bin", naming=naming, hf_prefix="dinov2_with_registers", config=expected
    )
    assert '"model_type": "dinov2_with_registers"' in (path / "config.json").read_text()
    with open_checkpoint(path) as ckpt:
        assert ckpt.config == expected and ckpt.layout == "dinov2-reg"
        assert ckpt.source_names("reg_token") == ("dinov2_with_registers.embeddings.register_tokens",)
        assert_tensors(ckpt, {k: canonical[k] for k in model.state_dict()})
        assert_computes_like(ckpt, model)


def test_dinov2_37x37_grid_at_518_pixels(tmp_path: Path) -> None:
    cfg = ViTConfig(
        embed_dim=16, depth=1, num_heads=1, mlp_hidden=64, patch_size=14, img_size=518, num_classes=0, layer_scale=True
    )
    state_dict = make_vit_state_dict(cfg)
    assert state_dict["pos_embed"].shape == (1, 1 + 37 * 37, 16)
    with open_checkpoint(write_checkpoint(state_dict, tmp_path / "x.safetensors"), num_heads=1) as ckpt:
        assert ckpt.config == cfg and ckpt.layout == "dinov2"
        assert "grid 37×37: pos_embed's 1369 patch positions assumed square" in ckpt.notes
    path = write_checkpoint(
        state_dict, tmp_path / "hf", fmt="hf-dir", naming="hf-dinov2", config=cfg, layer_norm_eps=1e-6
    )
    with open_checkpoint(path) as ckpt:
        assert ckpt.config == cfg and ckpt.notes == ()  # image_size 518 from config.json


# DeiT-III and timm ViTs without a class token ---------------------------------------------------------------------


@pytest.mark.parametrize("naming", ["timm", "deit3"])
def test_deit3(tmp_path: Path, naming: str) -> None:
    model = timm_model("deit3_small_patch16_224", img_size=32, num_classes=10)
    reference = model.state_dict()
    path = write_checkpoint(reference, tmp_path / "deit3.pth", fmt="torch-zip", container="model", naming=naming)
    with open_checkpoint(path, num_heads=2) as ckpt:
        expected = dataclasses.replace(
            TINY_CONFIG, img_size=(32, 32), num_classes=10, layer_scale=True, no_embed_class=True
        )
        assert ckpt.config == expected and ckpt.layout == "deit3"
        assert_tensors(ckpt, reference)
        assert_computes_like(ckpt, model)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (  # timm's *_gap_* models: no class token, average pooling, the final norm before pooling
            lambda: timm_model("vit_base_patch16_gap_224", img_size=32, num_classes=10),
            dataclasses.replace(TINY_CONFIG, img_size=(32, 32), num_classes=10, class_token=False, global_pool="avg"),
        ),
        (  # no class token, fc_norm after pooling
            lambda: timm_model(
                "vit_base_patch16_224", img_size=32, num_classes=10, class_token=False, global_pool="avg", fc_norm=True
            ),
            dataclasses.replace(
                TINY_CONFIG, img_size=(32, 32), num_classes=10, class_token=False, global_pool="avg", fc_norm=True
            ),
        ),
        (  # a class token that is not pooled (MAE / BEiT fine-tuning style): fc_norm
            lambda: timm_vit(
                dataclasses.replace(TINY_CONFIG, img_size=(32, 32), num_classes=10, global_pool="avg", fc_norm=True)
            ),
            dataclasses.replace(TINY_CONFIG, img_size=(32, 32), num_classes=10, global_pool="avg", fc_norm=True),
        ),
    ],
)
def test_average_pooled_vits(tmp_path: Path, make, expected: ViTConfig) -> None:
    model = make()
    reference = model.state_dict()
    with open_checkpoint(write_checkpoint(reference, tmp_path / "x.safetensors"), num_heads=2) as ckpt:
        assert ckpt.config == expected and ckpt.layout == "vit-avgpool"
        assert_tensors(ckpt, reference)
        assert_computes_like(ckpt, model)


def test_plain_and_distilled_layout_names(tmp_path: Path) -> None:
    for cfg, layout in ((TINY_CONFIG, "vit"), (dataclasses.replace(TINY_CONFIG, distilled=True), "deit-distilled")):
        path = write_checkpoint(make_vit_state_dict(cfg), tmp_path / f"{layout}.safetensors")
        with open_checkpoint(path, num_heads=2) as ckpt:
            assert ckpt.layout == layout and ckpt.config == cfg


# CLIP ---------------------------------------------------------------------------------------------------------------


def clip_model() -> torch.nn.Module:
    return timm_model("vit_base_patch16_clip_quickgelu_224", img_size=32, num_classes=0)


def test_openai_clip_image_tower_of_a_whole_clip_checkpoint(tmp_path: Path) -> None:
    """OpenCLIP's file: a whole CLIP model under `state_dict`, names with `module.`; the text tower is left out."""
    model = clip_model()
    reference = model.state_dict()
    path = write_checkpoint(
        reference,
        tmp_path / "open_clip.pt",
        fmt="torch-zip",
        container="state_dict",
        wrapper_prefix="module.",
        naming="openai-clip",
        text_tower=True,
    )
    stored = torch.load(path, weights_only=True)["state_dict"]
    timm_view = {k: v for k, v in filter_fn({"state_dict": stored}, model).items() if not k.startswith("head.")}
    with open_checkpoint(path, num_heads=2) as ckpt:
        assert ckpt.config == CLIP and ckpt.layout == "clip" and ckpt.naming == "openai-clip"
        assert_tensors(ckpt, reference)
        assert_tensors(ckpt, timm_view)
        assert torch.equal(ckpt.get("cls_token").flatten(), stored["module.visual.class_embedding"])
        assert torch.equal(ckpt.get("pos_embed")[0], stored["module.visual.positional_embedding"])
        assert ckpt.source_names("blocks.0.attn.qkv.bias") == (
            "module.visual.transformer.resblocks.0.attn.in_proj_bias",
        )
        assert ckpt.info("cls_token").shape == (1, 1, 32) and ckpt.info("pos_embed").shape == (1, 5, 32)
        assert [(info.name, info.shape) for info in ckpt.ignored] == [("module.visual.proj", (32, 16))]
        assert ckpt.notes[0].startswith("10 tensor(s) outside 'visual.' not read (e.g. CLIP's text tower): ")
        assert "norm eps 1e-05: OpenAI CLIP's (no config.json gives layer_norm_eps)" in ckpt.notes
        assert any(note.startswith("act quick_gelu: OpenAI CLIP's") for note in ckpt.notes)
        assert_computes_like(ckpt, model)


def test_openai_clip_image_tower_alone(tmp_path: Path) -> None:
    model = clip_model()
    path = write_checkpoint(model.state_dict(), tmp_path / "visual.safetensors", naming="openai-clip")
    with open_checkpoint(path, num_heads=2) as ckpt:
        assert ckpt.config == CLIP and not any("outside" in note for note in ckpt.notes)
        assert_tensors(ckpt, model.state_dict())


@pytest.mark.parametrize(
    ("storage", "prefix"),
    [
        ({"fmt": "hf-dir"}, "vision_model."),  # CLIPVisionModelWithProjection
        ({"fmt": "hf-dir-sharded", "hf_prefix": ""}, ""),  # transformers 5 CLIPVisionModel
        ({"fmt": "hf-dir-bin", "text_tower": True, "model_type": "clip"}, "vision_model."),  # CLIPModel
    ],
)
def test_hf_clip(tmp_path: Path, storage: dict[str, object], prefix: str) -> None:
    model = clip_model()
    reference = model.state_dict()
    path = write_checkpoint(
        reference,
        tmp_path / "hf",
        naming="hf-clip",
        config=CLIP,
        layer_norm_eps=1e-5,
        hidden_act="quick_gelu",
        **storage,
    )
    with open_checkpoint(path) as ckpt:
        assert ckpt.config == CLIP and ckpt.layout == "clip" and ckpt.naming == "hf-clip"
        assert_tensors(ckpt, reference)
        assert ckpt.source_names("blocks.1.attn.qkv.weight") == tuple(
            f"{prefix}encoder.layers.1.self_attn.{part}_proj.weight" for part in "qkv"
        )
        ignored = [f"{prefix}embeddings.position_ids"] + (["visual_projection.weight"] if prefix else [])
        assert sorted(info.name for info in ckpt.ignored) == sorted(ignored)
        outside = [note for note in ckpt.notes if "outside" in note]
        assert len(outside) == (1 if storage.get("text_tower") else 0)
        assert not any(note.startswith(("norm eps", "act")) for note in ckpt.notes)  # config.json says both
        assert_computes_like(ckpt, model)


def test_hf_clip_defaults_and_a_gelu_clip(tmp_path: Path) -> None:
    model = clip_model()
    path = write_checkpoint(model.state_dict(), tmp_path / "model.safetensors", naming="hf-clip")
    with open_checkpoint(path, num_heads=2) as ckpt:  # no config.json: transformers' CLIPVisionConfig defaults
        assert ckpt.config == CLIP
        assert "norm eps 1e-05: transformers' CLIPVisionConfig default (no config.json gives layer_norm_eps)" in (
            ckpt.notes
        )
    path = write_checkpoint(model.state_dict(), tmp_path / "hf", fmt="hf-dir", naming="hf-clip", config=CLIP)
    with open_checkpoint(path) as ckpt:  # hidden_act "gelu" (an OpenCLIP-trained tower)
        assert ckpt.config == dataclasses.replace(CLIP, act="gelu")


def test_timm_named_clip(tmp_path: Path) -> None:
    """timm's own CLIP models: the activation comes from a timm hub config.json's architecture name."""
    model = clip_model()
    write_checkpoint(model.state_dict(), tmp_path / "model.safetensors")
    with open_checkpoint(tmp_path / "model.safetensors", num_heads=2) as ckpt:
        assert ckpt.config == dataclasses.replace(CLIP, act="gelu") and ckpt.layout == "clip"
        assert any(note.startswith("act gelu: timm's CLIP models'") for note in ckpt.notes)
    (tmp_path / "config.json").write_text('{"architecture": "vit_base_patch16_clip_quickgelu_224"}')
    with open_checkpoint(tmp_path / "model.safetensors", num_heads=2) as ckpt:
        assert ckpt.config == CLIP
        assert_computes_like(ckpt, model)
