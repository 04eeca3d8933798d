"""Tiny random ViT checkpoints in every format, container and naming the reader supports (for any test).

    sd = make_vit_state_dict(ViTConfig(embed_dim=32, depth=2, num_heads=2, mlp_hidden=128, patch_size=4,
                                       img_size=(16, 16), num_classes=10))
    path = write_checkpoint(sd, tmp_path / "deit.pth", fmt="torch-zip", container="deit-train")
    path = write_checkpoint(sd, tmp_path / "hf", fmt="hf-dir", naming="hf-legacy", hf_prefix="vit", config=cfg)

The key layouts are written out here from the upstream models (timm's VisionTransformer and DeiT, facebookresearch
DINOv2, OpenAI CLIP, transformers' ViT / DeiT / Dinov2 / Dinov2WithRegisters / CLIP) on purpose, independently of
`tmconvert.converter.checkpoint.naming`, so tests of the reader do not share its table.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from tmconvert.models.vit import ViTConfig

FORMATS = (
    "safetensors",  # one .safetensors file
    "safetensors-sharded",  # path = folder: model-0000i-of-0000n.safetensors + model.safetensors.index.json
    "torch-zip",  # torch.save (zip archive)
    "torch-legacy",  # torch.save(_use_new_zipfile_serialization=False)
    "torch-sharded",  # path = folder: pytorch_model-0000i-of-0000n.bin + pytorch_model.bin.index.json
    "hf-dir",  # path = folder: config.json + model.safetensors
    "hf-dir-sharded",  # path = folder: config.json + sharded safetensors
    "hf-dir-bin",  # path = folder: config.json + pytorch_model.bin
    "hf-dir-bin-sharded",  # path = folder: config.json + sharded pytorch_model.bin
)
CONTAINERS = ("flat", "model", "state_dict", "model_ema", "state_dict_ema", "deit-train")
NAMINGS = (
    "timm",
    "deit3",  # timm with the released `gamma_1/gamma_2` LayerScale names
    "dinov2-fb",  # facebookresearch DINOv2 hub weights: timm names, `register_tokens`, a `mask_token`
    "hf-legacy",  # transformers ViTModel / DeiTModel hub files
    "hf-v5",  # transformers 5 ViT / DeiT `state_dict()` names
    "hf-dinov2",  # transformers Dinov2Model / Dinov2WithRegistersModel hub files
    "hf-dinov2-v5",  # the same, transformers 5 names
    "openai-clip",  # OpenAI CLIP / OpenCLIP state dict: the image tower under `visual.`
    "hf-clip",  # transformers CLIPVisionModel(WithProjection) / CLIPModel
)
CLIP_EMBED = 16  # width of CLIP's joint image-text space (`visual.proj`, `visual_projection`)

SMALL = ViTConfig(embed_dim=32, depth=2, num_heads=2, mlp_hidden=128, patch_size=4, img_size=(16, 16), num_classes=10)


def make_vit_state_dict(cfg: ViTConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random tensors under timm names with timm's shapes, in timm's state_dict order."""
    g = torch.Generator().manual_seed(seed)
    d, m = cfg.embed_dim, cfg.mlp_hidden
    prefix = 0 if cfg.no_embed_class else int(cfg.class_token) + int(cfg.distilled)  # registers never get a position
    shapes: dict[str, tuple[int, ...]] = {}
    if cfg.class_token:
        shapes["cls_token"] = (1, 1, d)
    if cfg.reg_tokens:
        shapes["reg_token"] = (1, cfg.reg_tokens, d)
    shapes["pos_embed"] = (1, cfg.num_patches + prefix, d)
    if cfg.distilled:
        shapes["dist_token"] = (1, 1, d)
    shapes["patch_embed.proj.weight"] = (d, cfg.in_chans, cfg.patch_size, cfg.patch_size)
    if cfg.patch_bias:
        shapes["patch_embed.proj.bias"] = (d,)
    if cfg.pre_norm:
        shapes["norm_pre.weight"] = shapes["norm_pre.bias"] = (d,)
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        shapes[b + "norm1.weight"] = shapes[b + "norm1.bias"] = (d,)
        shapes[b + "attn.qkv.weight"] = (3 * d, d)
        if cfg.qkv_bias:
            shapes[b + "attn.qkv.bias"] = (3 * d,)
        shapes[b + "attn.proj.weight"] = (d, d)
        shapes[b + "attn.proj.bias"] = (d,)
        if cfg.layer_scale:
            shapes[b + "ls1.gamma"] = (d,)
        shapes[b + "norm2.weight"] = shapes[b + "norm2.bias"] = (d,)
        shapes[b + "mlp.fc1.weight"] = (m, d)
        shapes[b + "mlp.fc1.bias"] = (m,)
        shapes[b + "mlp.fc2.weight"] = (d, m)
        shapes[b + "mlp.fc2.bias"] = (d,)
        if cfg.layer_scale:
            shapes[b + "ls2.gamma"] = (d,)
    final_norm = "fc_norm" if cfg.fc_norm else "norm"
    shapes[f"{final_norm}.weight"] = shapes[f"{final_norm}.bias"] = (d,)
    if cfg.num_classes:
        shapes["head.weight"] = (cfg.num_classes, d)
        shapes["head.bias"] = (cfg.num_classes,)
        if cfg.distilled:
            shapes["head_dist.weight"] = (cfg.num_classes, d)
            shapes["head_dist.bias"] = (cfg.num_classes,)
    return {name: torch.randn(shape, generator=g).to(dtype) for name, shape in shapes.items()}


def rename(
    state_dict: dict[str, torch.Tensor],
    naming: str,
    *,
    hf_prefix: str | None = None,
    pooler: bool = False,
    linear_patch: bool = False,
    text_tower: bool = False,
) -> dict[str, torch.Tensor]:
    """timm-named tensors → the names (and split q/k/v, CLIP's shapes) of `naming`.

    hf_prefix: 'vit' / 'deit' for the *ForImageClassification layouts, '' for a headless ViTModel (default: 'vit'
    with a head, '' without); for DINOv2 'dinov2' / 'dinov2_with_registers' or '' (default ''), for HF CLIP
    'vision_model' (default) or '' (transformers 5 CLIPVisionModel). pooler: add a random `pooler.dense` (HF
    ViTModel). linear_patch: store the patch embedding as timm's old 2-D linear patchify weight. text_tower: CLIP
    only, write a whole CLIP model: a random text tower and both projections besides the image tower.
    """
    out = dict(state_dict)
    if linear_patch:
        weight = out["patch_embed.proj.weight"]
        out["patch_embed.proj.weight"] = weight.reshape(weight.shape[0], -1)
    if naming == "timm":
        return out
    if naming == "deit3":
        return {re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", name): t for name, t in out.items()}
    if naming == "dinov2-fb":
        d = out["pos_embed"].shape[-1]
        renamed = {("register_tokens" if name == "reg_token" else name): t for name, t in out.items()}
        return {**renamed, "mask_token": torch.randn(1, d)}
    if naming in ("hf-dinov2", "hf-dinov2-v5"):
        return _hf_dinov2_rename(out, v5=naming == "hf-dinov2-v5", hf_prefix=hf_prefix or "")
    if naming == "openai-clip":
        return _openai_clip_rename(out, text_tower=text_tower)
    if naming == "hf-clip":
        return _hf_clip_rename(out, text_tower=text_tower, hf_prefix="vision_model" if hf_prefix is None else hf_prefix)
    if naming not in ("hf-legacy", "hf-v5"):
        raise ValueError(f"unknown naming {naming!r}; expected one of {NAMINGS}")
    return _hf_rename(out, naming, hf_prefix=hf_prefix, pooler=pooler)


def hf_config(
    cfg: ViTConfig, *, model_type: str = "vit", layer_norm_eps: float | None = None, hidden_act: str | None = "gelu"
) -> dict[str, object]:
    """A transformers config.json for `cfg` (layer_norm_eps / hidden_act None → omitted, the HF default applies).

    model_type: 'vit' / 'deit' (ViTConfig, DeiTConfig), 'dinov2' / 'dinov2_with_registers' (the MLP width as
    `mlp_ratio`, `layerscale_value`, `use_swiglu_ffn`, `num_register_tokens`), 'clip_vision_model'
    (CLIPVisionConfig) or 'clip' (a CLIPConfig: the image tower's settings in `vision_config`).
    """
    height, width = cfg.img_size
    config: dict[str, object] = {
        "model_type": model_type,
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.mlp_hidden,
        "image_size": height if height == width else [height, width],
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "qkv_bias": cfg.qkv_bias,
    }
    if hidden_act is not None:
        config["hidden_act"] = hidden_act
    if layer_norm_eps is not None:
        config["layer_norm_eps"] = layer_norm_eps
    if model_type.startswith("dinov2"):
        del config["intermediate_size"]
        config.update(mlp_ratio=cfg.mlp_hidden / cfg.embed_dim, layerscale_value=1.0, use_swiglu_ffn=False)
        if model_type == "dinov2_with_registers":
            config["num_register_tokens"] = cfg.reg_tokens
    if model_type.startswith("clip"):
        del config["qkv_bias"]
        config["projection_dim"] = CLIP_EMBED
    if model_type == "clip":
        vision = {**config, "model_type": "clip_vision_model"}
        return {
            "model_type": "clip",
            "projection_dim": CLIP_EMBED,
            "text_config": {"hidden_size": 8},
            "vision_config": vision,
        }
    return config


def write_checkpoint(
    state_dict: dict[str, torch.Tensor],
    path: str | Path,
    *,
    fmt: str = "safetensors",
    container: str = "flat",
    naming: str = "timm",
    wrapper_prefix: str = "",
    ema_state_dict: dict[str, torch.Tensor] | None = None,
    hf_prefix: str | None = None,
    pooler: bool = False,
    linear_patch: bool = False,
    config: ViTConfig | None = None,
    layer_norm_eps: float | None = None,
    hidden_act: str | None = "gelu",
    model_type: str | None = None,
    text_tower: bool = False,
    shards: int = 2,
) -> Path:
    """Write timm-named `state_dict` as a checkpoint; returns the path to hand to `open_checkpoint`.

    container 'deit-train' is a facebookresearch DeiT training checkpoint: model, model_ema (`ema_state_dict`, by
    default the model's tensors + 1 so tests can tell them apart), optimizer, lr_scheduler, scaler, epoch and
    `args` (an argparse.Namespace). wrapper_prefix ('module.', '_orig_mod.') is put before every name. For the
    hf-dir formats a config.json is written when `config` is given (model_type by default from the naming:
    'deit' if hf_prefix is 'deit', 'dinov2' or 'dinov2_with_registers' for the DINOv2 namings, 'clip_vision_model'
    for hf-clip, else 'vit').
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown fmt {fmt!r}; expected one of {FORMATS}")
    if container not in CONTAINERS:
        raise ValueError(f"unknown container {container!r}; expected one of {CONTAINERS}")

    def prepare(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        named = rename(sd, naming, hf_prefix=hf_prefix, pooler=pooler, linear_patch=linear_patch, text_tower=text_tower)
        return {wrapper_prefix + name: t.contiguous().clone() for name, t in named.items()}

    tensors = prepare(state_dict)
    if fmt.startswith("hf-dir"):
        path.mkdir(parents=True, exist_ok=True)
        if config is not None:
            if model_type is None:
                model_type = _default_model_type(naming, hf_prefix, config)
            written = hf_config(config, model_type=model_type, layer_norm_eps=layer_norm_eps, hidden_act=hidden_act)
            text = json.dumps(written, indent=2)
            (path / "config.json").write_text(text)
        inner = {
            "hf-dir": "safetensors",
            "hf-dir-sharded": "safetensors-sharded",
            "hf-dir-bin": "torch-zip",
            "hf-dir-bin-sharded": "torch-sharded",
        }[fmt]
        name = {"safetensors": "model.safetensors", "torch-zip": "pytorch_model.bin"}.get(inner, "")
        _write(tensors, path / name if name else path, inner, "flat", state_dict, prepare, ema_state_dict, shards)
        return path
    return _write(tensors, path, fmt, container, state_dict, prepare, ema_state_dict, shards)


def _write(
    tensors: dict[str, torch.Tensor],
    path: Path,
    fmt: str,
    container: str,
    state_dict: dict[str, torch.Tensor],
    prepare: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    ema_state_dict: dict[str, torch.Tensor] | None,
    shards: int,
) -> Path:
    if fmt in ("safetensors", "safetensors-sharded", "torch-sharded") and container != "flat":
        raise ValueError(f"{fmt} holds a flat state dict only (got container {container!r})")
    if fmt == "safetensors":
        save_file(tensors, str(path), metadata={"format": "pt"})
        return path
    if fmt in ("safetensors-sharded", "torch-sharded"):
        path.mkdir(parents=True, exist_ok=True)
        stem, suffix = ("model", "safetensors") if fmt == "safetensors-sharded" else ("pytorch_model", "bin")
        names = list(tensors)
        weight_map = {}
        for k in range(shards):
            shard_name = f"{stem}-{k + 1:05d}-of-{shards:05d}.{suffix}"
            part = {name: tensors[name] for name in names[k::shards]}
            if fmt == "safetensors-sharded":
                save_file(part, str(path / shard_name), metadata={"format": "pt"})
            else:
                torch.save(part, path / shard_name)
            weight_map.update(dict.fromkeys(part, shard_name))
        index = path / f"{stem}.{suffix}.index.json"
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        return index
    ema = prepare(ema_state_dict if ema_state_dict is not None else {k: v + 1 for k, v in state_dict.items()})
    obj = _container(tensors, container, ema)
    torch.save(obj, path, _use_new_zipfile_serialization=fmt == "torch-zip")
    return path


def _container(tensors: dict[str, torch.Tensor], container: str, ema: dict[str, torch.Tensor]) -> object:
    if container == "flat":
        return tensors
    if container == "deit-train":  # facebookresearch/deit main.py: what a training checkpoint holds
        first = next(iter(tensors.values()))
        return {
            "model": tensors,
            "optimizer": {
                "state": {
                    0: {
                        "step": torch.tensor(10.0),
                        "exp_avg": torch.zeros_like(first),
                        "exp_avg_sq": torch.zeros_like(first),
                    }
                },
                "param_groups": [
                    {
                        "lr": 5e-4,
                        "betas": (0.9, 0.999),
                        "eps": 1e-8,
                        "weight_decay": 0.05,
                        "amsgrad": False,
                        "params": [0],
                    }
                ],
            },
            "lr_scheduler": {"t_initial": 300, "warmup_t": 5, "base_values": [5e-4], "_last_epoch": 3},
            "epoch": 3,
            "model_ema": ema,
            "scaler": {
                "scale": 65536.0,
                "growth_factor": 2.0,
                "backoff_factor": 0.5,
                "growth_interval": 2000,
                "_growth_tracker": 0,
            },
            "args": argparse.Namespace(
                model="deit_tiny_patch16_224",
                input_size=224,
                batch_size=128,
                lr=5e-4,
                epochs=300,
                model_ema=True,
                model_ema_decay=0.99996,
                drop_path=0.1,
                output_dir="out",
                distillation_type="none",
                opt_betas=None,
                data_set="IMNET",
                seed=0,
            ),
        }
    return {container: tensors, "epoch": 3}


def _hf_rename(
    sd: dict[str, torch.Tensor], naming: str, *, hf_prefix: str | None, pooler: bool
) -> dict[str, torch.Tensor]:
    """timm → transformers names (ViTModel / DeiTModel, legacy and v5); q/k/v split from the fused qkv rows."""
    legacy = naming == "hf-legacy"
    has_head = "head.weight" in sd
    prefix = ("vit" if has_head else "") if hf_prefix is None else hf_prefix
    if has_head and not prefix:
        raise ValueError("a classifier head needs hf_prefix 'vit' or 'deit' (ViTModel has no head)")
    if any(".ls1." in name or ".ls2." in name for name in sd):
        raise ValueError("Hugging Face ViT/DeiT have no LayerScale")
    base = f"{prefix}." if prefix else ""
    attention = (
        ("attention.attention.query", "attention.attention.key", "attention.attention.value", "attention.output.dense")
        if legacy
        else ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj")
    )
    block_names = {
        "norm1": "layernorm_before",
        "attn.proj": attention[3],
        "norm2": "layernorm_after",
        "mlp.fc1": "intermediate.dense" if legacy else "mlp.fc1",
        "mlp.fc2": "output.dense" if legacy else "mlp.fc2",
    }
    distilled = "head_dist.weight" in sd
    top_names = {
        "cls_token": f"{base}embeddings.cls_token",
        "dist_token": f"{base}embeddings.distillation_token",
        "pos_embed": f"{base}embeddings.position_embeddings",
        "patch_embed.proj.weight": f"{base}embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": f"{base}embeddings.patch_embeddings.projection.bias",
        "norm.weight": f"{base}layernorm.weight",
        "norm.bias": f"{base}layernorm.bias",
        "head.weight": "cls_classifier.weight" if distilled else "classifier.weight",
        "head.bias": "cls_classifier.bias" if distilled else "classifier.bias",
        "head_dist.weight": "distillation_classifier.weight",
        "head_dist.bias": "distillation_classifier.bias",
    }
    out: dict[str, torch.Tensor] = {}
    for name, tensor in sd.items():
        block = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$", name)
        if block is None:
            out[top_names[name]] = tensor
            continue
        index, module, param = block.groups()
        layer = f"{base}encoder.layer.{index}." if legacy else f"{base}layers.{index}."
        if module == "attn.qkv":
            for part_name, part in zip(attention[:3], tensor.chunk(3, dim=0), strict=True):
                out[f"{layer}{part_name}.{param}"] = part
        else:
            out[f"{layer}{block_names[module]}.{param}"] = tensor
    if pooler:
        d = sd["norm.weight"].shape[0]
        out[f"{base}pooler.dense.weight"] = torch.randn(d, d)
        out[f"{base}pooler.dense.bias"] = torch.randn(d)
    return out


def _default_model_type(naming: str, hf_prefix: str | None, config: ViTConfig) -> str:
    if naming.startswith("hf-dinov2"):
        return "dinov2_with_registers" if config.reg_tokens else "dinov2"
    if naming == "hf-clip":
        return "clip_vision_model"
    return "deit" if hf_prefix == "deit" else "vit"


def _blocks(sd: dict[str, torch.Tensor]) -> list[tuple[str, str, str, torch.Tensor]]:
    """(block index, module, param, tensor) of the timm block tensors, in order."""
    found = (re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$", name) for name in sd)
    return [(*m.groups(), sd[m.group(0)]) for m in found if m]


def _hf_dinov2_rename(sd: dict[str, torch.Tensor], *, v5: bool, hf_prefix: str) -> dict[str, torch.Tensor]:
    """timm (facebookresearch) DINOv2 → transformers Dinov2Model / Dinov2WithRegistersModel (`hf_prefix` 'dinov2' /
    'dinov2_with_registers' as in their *ForImageClassification); always with `embeddings.mask_token` (1, D)."""
    if "head.weight" in sd:
        raise ValueError("transformers' Dinov2 classifier reads 2×D features; add `classifier.*` by hand")
    base = f"{hf_prefix}." if hf_prefix else ""
    d = sd["pos_embed"].shape[-1]
    attention = (
        ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj")
        if v5
        else (
            "attention.attention.query",
            "attention.attention.key",
            "attention.attention.value",
            "attention.output.dense",
        )
    )
    block_names = {
        "norm1": "norm1",
        "attn.proj": attention[3],
        "ls1": "layer_scale1",
        "norm2": "norm2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "ls2": "layer_scale2",
    }
    out = {
        f"{base}embeddings.cls_token": sd["cls_token"],
        f"{base}embeddings.mask_token": torch.randn(1, d),
        f"{base}embeddings.position_embeddings": sd["pos_embed"],
        f"{base}embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        f"{base}embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
    }
    if "reg_token" in sd:
        out[f"{base}embeddings.register_tokens"] = sd["reg_token"]
    for index, module, param, tensor in _blocks(sd):
        layer = f"{base}encoder.layer.{index}."
        if module == "attn.qkv":
            for part_name, part in zip(attention[:3], tensor.chunk(3, dim=0), strict=True):
                out[f"{layer}{part_name}.{param}"] = part
        elif param == "gamma":
            out[f"{layer}{block_names[module]}.lambda1"] = tensor
        else:
            out[f"{layer}{block_names[module]}.{param}"] = tensor
    out[f"{base}layernorm.weight"] = sd["norm.weight"]
    out[f"{base}layernorm.bias"] = sd["norm.bias"]
    return out


def _openai_clip_rename(sd: dict[str, torch.Tensor], *, text_tower: bool) -> dict[str, torch.Tensor]:
    """timm CLIP image tower → OpenAI CLIP's `visual.*` (class embedding (D,), positions (T, D), fused in_proj),
    with a random `visual.proj` (D, E); text_tower adds the rest of a CLIP model, as OpenAI / OpenCLIP save it."""
    if "head.weight" in sd or "patch_embed.proj.bias" in sd or "norm_pre.weight" not in sd:
        raise ValueError("an OpenAI CLIP image tower has no head, no patch bias and a pre-norm")
    d = sd["pos_embed"].shape[-1]
    block_names = {
        "norm1": "ln_1",
        "attn.proj": "attn.out_proj",
        "norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    out: dict[str, torch.Tensor] = {}
    if text_tower:  # OpenAI's model.state_dict() starts with these
        out.update(positional_embedding=torch.randn(7, 8), text_projection=torch.randn(8, CLIP_EMBED))
        out["logit_scale"] = torch.tensor(4.6052)
    out.update(
        {
            "visual.class_embedding": sd["cls_token"].reshape(d),
            "visual.positional_embedding": sd["pos_embed"].reshape(-1, d),
            "visual.proj": torch.randn(d, CLIP_EMBED),
            "visual.conv1.weight": sd["patch_embed.proj.weight"],
            "visual.ln_pre.weight": sd["norm_pre.weight"],
            "visual.ln_pre.bias": sd["norm_pre.bias"],
        }
    )
    for index, module, param, tensor in _blocks(sd):
        layer = f"visual.transformer.resblocks.{index}."
        if module == "attn.qkv":
            out[f"{layer}attn.in_proj_{param}"] = tensor
        else:
            out[f"{layer}{block_names[module]}.{param}"] = tensor
    out["visual.ln_post.weight"] = sd["norm.weight"]
    out["visual.ln_post.bias"] = sd["norm.bias"]
    if text_tower:
        out["transformer.resblocks.0.ln_1.weight"] = torch.randn(8)
        out["transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(24, 8)
        out["transformer.resblocks.0.attn.in_proj_bias"] = torch.randn(24)
        out["transformer.resblocks.0.mlp.c_fc.weight"] = torch.randn(32, 8)
        out["token_embedding.weight"] = torch.randn(50, 8)
        out["ln_final.weight"] = torch.randn(8)
        out["ln_final.bias"] = torch.randn(8)
    return out


def _hf_clip_rename(sd: dict[str, torch.Tensor], *, text_tower: bool, hf_prefix: str) -> dict[str, torch.Tensor]:
    """timm CLIP image tower → transformers CLIPVisionModel (`vision_model.` prefix; '' = transformers 5), with the
    `position_ids` buffer older files hold; text_tower makes it a CLIPModel (text model, both projections)."""
    if "head.weight" in sd or "patch_embed.proj.bias" in sd or "norm_pre.weight" not in sd:
        raise ValueError("a CLIP image tower has no head, no patch bias and a pre-norm")
    base = f"{hf_prefix}." if hf_prefix else ""
    d = sd["pos_embed"].shape[-1]
    positions = sd["pos_embed"].shape[-2]
    block_names = {
        "norm1": "layer_norm1",
        "attn.proj": "self_attn.out_proj",
        "norm2": "layer_norm2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    out: dict[str, torch.Tensor] = {}
    if text_tower:
        out["logit_scale"] = torch.tensor(4.6052)
        out["text_model.embeddings.token_embedding.weight"] = torch.randn(50, 8)
        out["text_model.embeddings.position_embedding.weight"] = torch.randn(7, 8)
        out["text_model.encoder.layers.0.self_attn.q_proj.weight"] = torch.randn(8, 8)
        out["text_model.encoder.layers.0.layer_norm1.weight"] = torch.randn(8)
        out["text_model.final_layer_norm.weight"] = torch.randn(8)
    out.update(
        {
            f"{base}embeddings.class_embedding": sd["cls_token"].reshape(d),
            f"{base}embeddings.patch_embedding.weight": sd["patch_embed.proj.weight"],
            f"{base}embeddings.position_embedding.weight": sd["pos_embed"].reshape(-1, d),
            f"{base}embeddings.position_ids": torch.arange(positions).reshape(1, -1),
            f"{base}pre_layrnorm.weight": sd["norm_pre.weight"],  # sic
            f"{base}pre_layrnorm.bias": sd["norm_pre.bias"],
        }
    )
    for index, module, param, tensor in _blocks(sd):
        layer = f"{base}encoder.layers.{index}."
        if module == "attn.qkv":
            for part_name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
                out[f"{layer}self_attn.{part_name}.{param}"] = part
        else:
            out[f"{layer}{block_names[module]}.{param}"] = tensor
    out[f"{base}post_layernorm.weight"] = sd["norm.weight"]
    out[f"{base}post_layernorm.bias"] = sd["norm.bias"]
    if base:  # CLIPVisionModelWithProjection / CLIPModel
        out["visual_projection.weight"] = torch.randn(CLIP_EMBED, d)
    if text_tower:
        out["text_projection.weight"] = torch.randn(CLIP_EMBED, 8)
    return out
