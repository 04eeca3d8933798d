"""Numerical verification of a converted ViM: it runs, its backends agree, and it resembles its teacher.

Runs after every conversion (unless `--no-verify`) and as `tmconvert verify OUT [--teacher SRC]`:
1. build the target from the written file alone (config from its metadata) and run calibration images through it;
   anything non-finite fails;
2. run the same images through every selective-scan backend usable here and compare each with `reference`;
3. with the teacher: per-layer cosine similarity of student and teacher token features, pairing student layer j
   with the teacher block the layer plan names and comparing on the residual channels the student kept, and top-1
   agreement of the logits when the classifier was inherited.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tmconvert.converter.checkpoint import Checkpoint
from tmconvert.converter.data.calibration import calibration_batches
from tmconvert.converter.errors import TmconvertError
from tmconvert.converter.modelfile.converted import load_converted
from tmconvert.kernels import available_backends, use_backend
from tmconvert.models import MambaOutput, ViTConfig, build_model

# Relative L2 error allowed between a backend and `reference` on fp32 logits and final tokens.
BACKEND_TOLERANCE = 1e-4


class VerificationError(TmconvertError):
    """A converted model failed verification (non-finite outputs or backends that disagree)."""


@dataclass
class LayerSimilarity:
    layer: int
    block: int | None  # teacher block the layer was initialised from; None for default-initialised layers
    cosine: float  # mean over tokens and images; against the last inherited block when `block` is None


@dataclass
class VerifyReport:
    path: str
    images: int
    finite: bool
    backends: dict[str, float]  # backend -> relative error vs reference (reference itself: 0.0)
    layers: list[LayerSimilarity] = field(default_factory=list)
    final_cosine: float | None = None
    top1_agreement: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _mean_token_cosine(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> float:
    return F.cosine_similarity(a.double(), b.double(), dim=-1)[:, valid].mean().item()


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _forward(model: torch.nn.Module, images: torch.Tensor, backend: str) -> MambaOutput:
    with use_backend(backend), torch.no_grad():
        return model.forward_all(images)


def verify_converted(
    path: str | Path,
    *,
    teacher: Checkpoint | None = None,
    calib: str | int = 8,
    max_images: int = 32,
    seed: int = 0,
    device: str | torch.device = "cpu",
    backends: list[str] | None = None,
) -> VerifyReport:
    """Verify the converted file at `path`; see the module docstring. Never raises for a failed check: the report
    lists the problems (`report.ok`), so callers decide how loud to be."""
    path = Path(path)
    cfg, state, metadata = load_converted(path)
    device = torch.device(device)
    student = build_model(cfg, device="meta")
    student.load_state_dict(state, strict=True, assign=True)
    student = student.float().to(device).eval()

    # Images at the student's input size; a teacher trained at another size resamples its position embedding.
    if teacher is not None:
        images_cfg = replace(teacher.config, img_size=cfg.img_size, in_chans=cfg.in_chans)
    else:
        images_cfg = ViTConfig(
            img_size=cfg.img_size,
            in_chans=cfg.in_chans,
            patch_size=cfg.patch_size,
            embed_dim=cfg.embed_dim,
            num_heads=1,
            mlp_hidden=cfg.embed_dim,
        )
    batches, count = [], 0
    for batch in calibration_batches(calib, images_cfg, seed=seed):
        batches.append(batch[: max_images - count])
        count += len(batches[-1])
        if count >= max_images:
            break
    images = torch.cat(batches).to(device)

    # On a CPU, Triton only runs in its interpreter (a debugging aid): compare it there only when asked to.
    usable = backends or [b for b in available_backends(device) if device.type == "cuda" or b != "triton"]
    outputs = {name: _forward(student, images, name) for name in usable}
    ref_name = "reference" if "reference" in outputs else usable[0]
    ref = outputs[ref_name]
    finite = all(torch.isfinite(t).all() for out in outputs.values() for t in (out.logits, out.final_tokens))
    report = VerifyReport(path=str(path), images=len(images), finite=bool(finite), backends={})
    if not finite:
        report.problems.append("non-finite values in the student's outputs")
    for name, out in outputs.items():
        err = max(_relative_error(out.logits, ref.logits), _relative_error(out.final_tokens, ref.final_tokens))
        report.backends[name] = err
        if err > BACKEND_TOLERANCE:
            report.problems.append(f"backend {name} differs from {ref_name} by {err:.2e} (> {BACKEND_TOLERANCE:g})")

    if teacher is None:
        return report
    vit = teacher.model().to(device).eval()
    with torch.no_grad():
        tout = vit.forward_all(images)
    teacher_grid = (cfg.img_size[0] // teacher.config.patch_size, cfg.img_size[1] // teacher.config.patch_size)
    try:
        token_index, valid = cfg.token_layout().positions_in(teacher.config.token_layout(teacher_grid))
    except ValueError:  # other patch size: no token-by-token comparison
        token_index = valid = None
    residual = metadata.get("index_sets", {}).get("residual", {}).get("indices", {})
    channels = torch.tensor(next(iter(residual.values())), device=device) if residual else None
    if token_index is not None and (channels is not None or cfg.embed_dim == teacher.config.embed_dim):
        token_index, valid = token_index.to(device), valid.to(device)

        def as_student(tokens: torch.Tensor) -> torch.Tensor:
            tokens = tokens[:, token_index]
            return tokens if channels is None else tokens[..., channels]

        plan = {row["layer"]: row["block"] for row in metadata.get("layer_plan", [])}
        last_block = None
        for j, tokens in enumerate(ref.layer_tokens):
            block = plan.get(j)
            last_block = block if block is not None else last_block
            compare = block if block is not None else last_block
            if compare is None:
                continue
            cos = _mean_token_cosine(tokens, as_student(tout.layer_tokens[compare]), valid)
            report.layers.append(LayerSimilarity(layer=j, block=block, cosine=cos))
        report.final_cosine = _mean_token_cosine(ref.final_tokens, as_student(tout.final_tokens), valid)
    if ref.logits.shape == tout.logits.shape and "head.weight" in teacher:
        agree = (ref.logits.argmax(-1) == tout.logits.argmax(-1)).double().mean().item()
        report.top1_agreement = agree
    return report
