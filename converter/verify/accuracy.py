"""Accuracy of a classifier on labelled images: what `tmconvert eval` reports (non-finite logits are an error, not
an accuracy: a NaN ranks arbitrarily)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tmconvert.converter.errors import ConfigError
from tmconvert.converter.verify.numeric import VerificationError


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
        return {
            "images": self.images,
            "top1": self.top1,
            "top5": self.top5,
            "loss": self.loss,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 1),
        }


@torch.no_grad()
def measure_accuracy(
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
        if not bool(torch.isfinite(logits).all()):
            raise VerificationError(
                f"the model's logits are not finite (NaN or inf) for images {seen} to {seen + len(labels) - 1}: "
                "no accuracy to report"
            )
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
