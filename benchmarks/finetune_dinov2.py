"""Fine-tune a pretrained DINOv2-S/14 on Fashion-MNIST at 112 px: the teacher of the real-teacher experiment.

The backbone comes from any checkpoint tmconvert reads (the Hugging Face folder `dinov2_teacher.py` writes, a timm
or bf16/fp16 copy of it, e.g. unpacked from `device_pack.py`), is loaded into the project's `VisionTransformer`
with the registry config `dinov2-s` at 112 px and 10 classes, its 37x37 position grid resampled to 8x8
(`resample_abs_pos_embed`, timm's bicubic with antialias) and a new zero-initialised head. Training uses the
project's data pipeline (`ImageDataset` + `Preprocess` + `train_batches`: grey images as RGB, ImageNet
normalisation, the seeded per-sample augmentation distillation uses) on the first `images` training images: AdamW
(no decay on biases, norms, LayerScale, position embedding and cls token), linear warm-up + cosine
(`warmup_cosine`), gradient clipping, label smoothing, bf16 autocast on CUDA.

The teacher is written as a timm-named `.safetensors` (what `tmconvert inspect`/`eval`/`convert` read) in its
shipped precision: the matrices in bfloat16 with `mantissa_bits` of 7 mantissa bits (7: plain bfloat16, which is
what bf16 autocast multiplies with anyway; fewer make it pack smaller for the 64 MiB device calls, see
`device_pack.py`), everything else in float32. Its accuracy is measured on exactly that file.

`dinov2_experiment.py finetune` runs this and records the row; standalone:

    python benchmarks/finetune_dinov2.py dinov2-s14 --out teacher.safetensors [--steps 585 --batch-size 256]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from device_pack import storage_precision
from safetensors.torch import save_file

from tmconvert.converter.checkpoint import open_checkpoint
from tmconvert.converter.data.loaders import ImageDataset, eval_batches, train_batches
from tmconvert.converter.data.preprocess import InputSpec, Preprocess
from tmconvert.converter.data.sources import open_source
from tmconvert.converter.distill.trainer import warmup_cosine
from tmconvert.converter.verify.accuracy import EvalResult, measure_accuracy
from tmconvert.models import VisionTransformer, get_config
from tmconvert.models.tokens import resample_abs_pos_embed

# The backbone fields that must match the registry config (everything but the input size and the head).
BACKBONE_FIELDS = (
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_hidden",
    "patch_size",
    "in_chans",
    "class_token",
    "layer_scale",
    "reg_tokens",
    "qkv_bias",
    "norm_eps",
    "act",
)
NO_DECAY = ("pos_embed", "cls_token")


@dataclass(frozen=True)
class FinetuneRecipe:
    steps: int = 585
    batch_size: int = 256
    images: int = 30000  # the first N training images
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    min_lr: float = 1e-6
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    augment: str = "resized_crop"
    scale: tuple[float, float] = (0.25, 1.0)
    seed: int = 0


def build_teacher(
    pretrained: Path, *, config: str = "dinov2-s", img_size: int = 112, num_classes: int = 10, seed: int = 0
) -> tuple[VisionTransformer, dict[str, Any]]:
    """The pretrained backbone at `img_size` with a zero-initialised `num_classes` head; also what was done."""
    cfg = dataclasses.replace(get_config(config), img_size=(img_size, img_size), num_classes=num_classes)
    with open_checkpoint(pretrained) as ckpt:
        src = ckpt.config
        state = {name: tensor.float() for name, tensor in ckpt.items() if not name.startswith("head")}
        layout = ckpt.layout
    wrong = {f: (getattr(src, f), getattr(cfg, f)) for f in BACKBONE_FIELDS if getattr(src, f) != getattr(cfg, f)}
    if wrong:
        raise SystemExit(f"{pretrained}: not a {config} backbone: (checkpoint, registry) differ in {wrong}")
    state["pos_embed"] = resample_abs_pos_embed(
        state["pos_embed"], cfg.grid, src.grid, num_prefix_tokens=src.pos_prefix_tokens
    )
    model = VisionTransformer(cfg, seed=seed)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"head.weight", "head.bias"}:
        raise SystemExit(f"{pretrained}: missing {missing}, unexpected {unexpected} (expected only the new head)")
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    info = {
        "pretrained": str(pretrained),
        "pretrained_layout": str(layout),
        "pretrained_grid": list(src.grid),
        "grid": list(cfg.grid),
        "img_size": img_size,
        "num_classes": num_classes,
    }
    return model, info


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or name in NO_DECAY else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def finetune(
    model: VisionTransformer,
    data: str,
    recipe: FinetuneRecipe,
    *,
    device: torch.device,
    workers: int,
    log_every: int = 50,
) -> dict[str, Any]:
    """Train `model` in place on `data[0:recipe.images]` (a `--data` spec of a labelled training split)."""
    cfg = model.cfg
    source = open_source(f"{data}[0:{recipe.images}]", split="train", img_size=cfg.img_size, option="finetune")
    spec = InputSpec.for_model(cfg.img_size, cfg.in_chans)
    preprocess = Preprocess(spec, train=True, augment=recipe.augment, scale=recipe.scale)
    cuda = device.type == "cuda"
    batches = train_batches(
        ImageDataset(source, preprocess, seed=recipe.seed),
        batch_per_rank=recipe.batch_size,
        seed=recipe.seed,
        workers=workers,
        pin_memory=cuda,
    )
    model.to(device).train()
    optimizer = torch.optim.AdamW(
        _param_groups(model, recipe.weight_decay), lr=recipe.lr, betas=(0.9, 0.999), fused=cuda or None
    )
    factor = warmup_cosine(recipe.steps, recipe.lr, recipe.warmup_fraction, recipe.min_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    torch.manual_seed(recipe.seed)
    start = window = time.perf_counter()
    losses = []
    for step in range(1, recipe.steps + 1):
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=recipe.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        scheduler.step()
        if step % log_every == 0 or step == recipe.steps:
            value = loss.item()
            if not math.isfinite(value):
                raise SystemExit(f"fine-tuning diverged at step {step} (loss {value})")
            losses.append(value)
            now = time.perf_counter()
            rate = min(log_every, step) * recipe.batch_size / max(now - window, 1e-9)
            print(
                f"finetune step {step}/{recipe.steps} loss {value:.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                f"{rate:.0f} img/s",
                flush=True,
            )
            window = now
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model.eval()
    return {
        "seconds": seconds,
        "img_per_s": recipe.steps * recipe.batch_size / seconds,
        "final_loss": losses[-1] if losses else None,
    }


def input_metadata(model: VisionTransformer) -> dict[str, Any]:
    spec = InputSpec.for_model(model.cfg.img_size, model.cfg.in_chans)
    return {"img_size": list(spec.img_size), "channels": spec.channels, "mean": list(spec.mean), "std": list(spec.std)}


def save_teacher(model: VisionTransformer, path: Path, mantissa_bits: int, metadata: dict[str, Any]) -> Path:
    """timm names, the matrices in bf16 with `mantissa_bits`, the rest in fp32; written atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    meta = {
        "format": "timm-vit",
        "dataset": "fashion-mnist",
        "input": json.dumps(input_metadata(model)),
        "mantissa_bits": str(mantissa_bits),
        **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(storage_precision(state, mantissa_bits), str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def accuracy(
    model: torch.nn.Module, data: str, *, split: str, device: torch.device, limit: int | None, workers: int
) -> EvalResult:
    """The project's evaluation (eval preprocessing, `measure_accuracy`, fp32) of an in-memory ViT."""
    cfg = model.cfg
    source = open_source(data, split=split, img_size=cfg.img_size, num_classes=cfg.num_classes)
    dataset = ImageDataset(source, Preprocess(InputSpec.for_model(cfg.img_size, cfg.in_chans), train=False))
    batches = eval_batches(dataset, batch_size=512, limit=limit, workers=workers)
    return measure_accuracy(model.to(device), batches, num_classes=cfg.num_classes, device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pretrained", type=Path, help="DINOv2-S/14 checkpoint (HF folder, safetensors, ...)")
    parser.add_argument("--out", type=Path, required=True, help="the fine-tuned teacher (.safetensors)")
    parser.add_argument("--data", default="fashion-mnist", help="fashion-mnist[:ROOT]")
    parser.add_argument("--steps", type=int, default=FinetuneRecipe.steps)
    parser.add_argument("--batch-size", type=int, default=FinetuneRecipe.batch_size)
    parser.add_argument("--images", type=int, default=FinetuneRecipe.images)
    parser.add_argument("--lr", type=float, default=FinetuneRecipe.lr)
    parser.add_argument("--mantissa-bits", type=int, default=7)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--eval-limit", type=int, default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    recipe = FinetuneRecipe(steps=args.steps, batch_size=args.batch_size, images=args.images, lr=args.lr)
    model, info = build_teacher(args.pretrained)
    done = finetune(model, args.data, recipe, device=device, workers=args.workers)
    print(
        json.dumps(
            {
                **info,
                **done,
                "fp32_test": accuracy(
                    model, args.data, split="test", device=device, limit=args.eval_limit, workers=args.workers
                ).to_json(),
            }
        )
    )
    save_teacher(model, args.out, args.mantissa_bits, {"recipe": dataclasses.asdict(recipe), **info})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
