"""What conversion tests of every target family share: the shipped teacher, real images, and the per-layer cosine of
a student to the teacher's block outputs, paired token by token as `tmconvert verify` pairs them."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tmconvert.converter.checkpoint import open_checkpoint
from tmconvert.converter.data.calibration import calibration_batches
from tmconvert.converter.verify.numeric import student_view
from tmconvert.models import VisionTransformer

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "assets" / "fmnist-vit-t.safetensors"  # DeiT-T-shaped, 28 px, patch 4 (7x7 grid), 10 classes


def teacher_and_images(count: int = 16) -> tuple[VisionTransformer, torch.Tensor]:
    """The shipped teacher in eval mode and the first `count` Fashion-MNIST training images as it sees them."""
    with open_checkpoint(TEACHER) as ckpt:
        teacher = ckpt.model().eval()
        images = next(iter(calibration_batches(f"fashion-mnist[:{count}]", ckpt.config, seed=0)))
    return teacher, images


@torch.no_grad()
def layer_cosines(student: nn.Module, teacher: VisionTransformer, images: torch.Tensor, layers: int) -> list[float]:
    """Mean cosine of student layer j's tokens to teacher block j's output, j < `layers`, each student token against
    the teacher's token of the same patch (cls with cls); the student is as wide as the teacher."""
    inputs, layout = student_view(student.cfg, images)
    index, valid = layout.positions_in(teacher.cfg.token_layout())
    s_out, t_out = student.eval().forward_all(inputs), teacher.forward_all(images)
    out = []
    for j in range(layers):
        s_tokens, t_tokens = s_out.layer_tokens[j][:, valid], t_out.layer_tokens[j][:, index[valid]]
        out.append(F.cosine_similarity(s_tokens.double(), t_tokens.double(), dim=-1).mean().item())
    return out
