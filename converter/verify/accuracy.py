"""Classifiers from any checkpoint, and their accuracy: what `tmconvert eval` runs and `distill` loads its models with.

`load_classifier(path)`: a ViM written by tmconvert (`convert` or `distill`: safetensors metadata `format: tmconvert`)
loads through `output.load_converted`; anything else goes through the ViT checkpoint readers (`open_checkpoint`).
Its input normalisation comes from the file's metadata `input` entry when there is one, else ImageNet's.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tmconvert.converter.checkpoint.reader import open_checkpoint
from tmconvert.converter.data.images import InputSpec
from tmconvert.converter.errors import CheckpointError, ConfigError, OutputError
from tmconvert.converter.modelfile.output import load_converted, read_metadata
from tmconvert.models.vim import VimConfig, VisionMamba
from tmconvert.models.vit import VisionTransformer, ViTConfig


@dataclass
class LoadedModel:
    """A runnable classifier with where it came from."""

    model: nn.Module
    family: str  # "vit" | "vim"
    config: ViTConfig | VimConfig
    metadata: dict[str, Any]
    path: Path
    files: tuple[Path, ...]  # the weight files read (what a fingerprint hashes)

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.for_model(self.config.img_size, self.config.in_chans, self.metadata)


def file_metadata(path: Path) -> dict[str, Any]:
    """The safetensors metadata of a single `.safetensors` file (JSON values decoded); {} for anything else."""
    if not (path.is_file() and path.suffix == ".safetensors"):
        return {}
    try:
        return read_metadata(path)
    except OutputError:  # not readable as safetensors: the checkpoint reader that opens it next says why
        return {}


def is_tmconvert_vim(metadata: dict[str, Any]) -> bool:
    return metadata.get("format") == "tmconvert" and metadata.get("family", "vim") == "vim"


def load_vit(path: Path, *, num_heads: int | None = None, ema: bool = False) -> LoadedModel:
    """A ViT checkpoint in any format the readers accept, as a float32 `VisionTransformer`."""
    with open_checkpoint(path, ema=ema, num_heads=num_heads) as ckpt:
        model = VisionTransformer(ckpt.config, device="meta")
        state = {name: tensor.float() for name, tensor in ckpt.items()}
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: does not load into a ViT ({str(exc).splitlines()[0]})") from None
        return LoadedModel(model, "vit", ckpt.config, file_metadata(path), path, tuple(ckpt.files))


def load_vim(path: Path) -> LoadedModel:
    """A ViM file written by tmconvert, as a float32 `VisionMamba`."""
    cfg, state, metadata = load_converted(path)
    model = VisionMamba(cfg, device="meta")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return LoadedModel(model, "vim", cfg, metadata, path, (path,))


def load_classifier(path: str | Path, *, num_heads: int | None = None, ema: bool = False) -> LoadedModel:
    """Any teacher (ViT readers) or student (tmconvert ViM) checkpoint as a model in eval mode."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    loaded = load_vim(path) if is_tmconvert_vim(file_metadata(path)) else load_vit(path, num_heads=num_heads, ema=ema)
    loaded.model.eval()
    return loaded


@dataclass
class EvalResult:
    images: int
    top1: float
    top5: float | None  # only when the model has more than 5 classes
    loss: float  # mean cross-entropy (no label smoothing)
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"images": self.images, "top1": self.top1, "top5": self.top5, "loss": self.loss,
                "seconds": round(self.seconds, 3), "images_per_second": round(self.images_per_second, 1)}  # fmt: skip


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    num_classes: int,
    device: torch.device | str = "cpu",
    amp: bool = False,
) -> EvalResult:
    """Top-1 (top-5 when `num_classes` > 5) and mean cross-entropy of `model` over labelled batches."""
    device = torch.device(device)
    model.eval()
    start = time.perf_counter()
    seen, correct1, correct5, loss_sum = 0, 0, 0, 0.0
    k = min(5, num_classes)
    for images, labels in batches:
        if bool((labels < 0).any()):
            raise ConfigError("evaluation needs labelled data (class subfolders, fashion-mnist or synthetic)")
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(k, dim=-1).indices
        hits = top == labels[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=-1).sum())
        seen += labels.numel()
    if seen == 0:
        raise ConfigError("evaluation got no images (empty data or --limit 0)")
    return EvalResult(
        images=seen,
        top1=correct1 / seen,
        top5=correct5 / seen if num_classes > 5 else None,
        loss=loss_sum / seen,
        seconds=time.perf_counter() - start,
    )
