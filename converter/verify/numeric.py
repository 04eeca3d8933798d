"""Numerical verification of a converted model (any target family): it runs, its backends agree, and it resembles
its teacher.

Runs after every conversion (unless `--no-verify`) and as `tmconvert verify OUT [--teacher SRC]`:
1. load the written file alone (`load_model_file`: the config from its metadata, every tensor checked against it)
   and run calibration images through it;
2. run the same images through every selective-scan backend usable here and compare each with `reference`;
3. with the teacher: per-layer cosine similarity of student and teacher token features, pairing student layer j
   with the teacher block the layer plan names and comparing on the residual channels the student kept, token by
   token (each student token against the teacher's token of the same patch, cls against cls: ViM's middle cls,
   PlainMamba's patches without one), the cosine of the final features, and top-1 agreement of the logits when both
   models classify into the same classes. A video student (VideoMamba) reads each image as a clip of one tubelet of
   identical frames, so its frame's tokens pair with the image teacher's. A hierarchical student (VMamba: its config
   has per-stage `depths`, each stage its own grid and width) pairs stage by stage (`_compare_stages`): the output
   tokens of a block of stage s on the stage's grid against the teacher block's patch tokens area-pooled to that
   grid (`pool_to_grid`), on the channels the stage kept (`residual@s`); the final features on the last stage's grid
   and channels (`residual@-1`); a block no teacher block fed is listed in `layers_not_compared`, not compared.

The verdict: `ok` is true when every check that ran passed, i.e. the student's weights and outputs and the
teacher's outputs are finite, every backend is within `BACKEND_TOLERANCE` of `reference`, and every similarity is a
finite number: a NaN or inf result is a failure, never a pass. A teacher measure that could not be made is not a
check that passed: `teacher_comparison` says what was compared ('not requested', 'done', 'partial' or 'skipped') and
`not_compared` why each missing measure ('layers', 'final', 'top1') is missing (another patch grid, other widths
without a record of the kept channels, a teacher without a head, ...). When the caller asks for the comparison
(`require_teacher`, as `tmconvert verify --teacher` does), features that could not be compared are a problem, so
`ok` is false. After a conversion they are not: a conversion may change the patch grid on purpose, and the report
says the comparison was skipped and why.

Similarity is measured, not judged: a model that was converted but not distilled (`stage` 'converted') has new,
untrained mixers, so its cosines and top-1 agreement start low (often 0 % agreement) and show where distillation
starts, not whether the conversion worked; `notes` says so.

On a CPU the student runs a few images at a time: the reference scan materialises (images × tokens × channels ×
state) tensors, and above 32 MB the C allocator maps each one fresh (page faults on every call) where smaller ones
are reused; batches kept under `CPU_SCAN_ELEMENTS` halve the time of a ViM-S on 32 images at 112 px.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tmconvert.converter.checkpoint import Checkpoint
from tmconvert.converter.configs import is_target_family
from tmconvert.converter.data.calibration import calibration_batches
from tmconvert.converter.errors import TmconvertError
from tmconvert.converter.modelfile.classifier import load_model_file, non_finite_tensors
from tmconvert.kernels import available_backends, use_backend
from tmconvert.models import MambaOutput, TokenLayout, ViTConfig
from tmconvert.models.vmamba import DIRECTIONS

# Relative L2 error allowed between a backend and `reference` on fp32 logits and final tokens.
BACKEND_TOLERANCE = 1e-4
# Elements of one (images × tokens × d_inner × d_state) scan tensor per CPU forward (16 MB of fp32).
CPU_SCAN_ELEMENTS = 1 << 22
MEASURES = ("layers", "final", "top1")  # what a teacher comparison measures (`VerifyReport.not_compared` keys)
NOT_DISTILLED = (
    "converted, not distilled: the Mamba mixers that replace attention are not trained yet, so low cosines and top-1 "
    "agreement (often 0 %) are expected; they show where distillation starts, not whether the conversion worked "
    "(`tmconvert distill` trains the student towards the teacher)"
)


class VerificationError(TmconvertError):
    """A model failed verification (non-finite outputs, backends that disagree), or its file cannot be verified."""


@dataclass
class LayerSimilarity:
    layer: int
    block: int | None  # teacher block the layer was initialised from; None for default-initialised layers
    cosine: float  # mean over tokens and images; against the last inherited block when `block` is None
    sublayer: str | None = None  # "attn" / "mlp": compared with the stream after that sub-layer; None: the block
    stage: int | None = None  # a hierarchical student's stage of the layer and its block within the stage; None: flat
    stage_block: int | None = None

    @property
    def label(self) -> str:
        """How the student names the layer: `3`, or `stage 1 block 0` for a hierarchical student."""
        return str(self.layer) if self.stage is None else f"stage {self.stage} block {self.stage_block}"


@dataclass
class VerifyReport:
    path: str
    images: int
    finite: bool
    backends: dict[str, float | None]  # backend -> relative error vs reference; None: not compared (non-finite)
    stage: str  # 'converted' or 'distilled' (the file's metadata): what similarity to the teacher to expect
    teacher_comparison: str = "not requested"  # 'not requested', 'done', 'partial' or 'skipped'
    not_compared: dict[str, str] = field(default_factory=dict)  # measure (`MEASURES`) -> why it was not made
    layers: list[LayerSimilarity] = field(default_factory=list)
    # a hierarchical student's blocks that no teacher block fed (`LayerSimilarity.label`s): not compared with any
    layers_not_compared: list[str] = field(default_factory=list)
    final_cosine: float | None = None
    top1_agreement: float | None = None
    notes: list[str] = field(default_factory=list)
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


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def student_view(cfg: Any, images: torch.Tensor) -> tuple[torch.Tensor, TokenLayout]:
    """What a student runs on for a batch of images, and where their tokens sit in its sequence.

    An image family reads the images as they are. A video family (its config has a `tubelet`: VideoMamba) reads each
    image as a clip of one tubelet of identical frames, one time step whose tokens are laid out as an image's."""
    tubelet = getattr(cfg, "tubelet", None)
    if tubelet is None:
        return images, cfg.token_layout()
    return images.unsqueeze(2).expand(-1, -1, tubelet, -1, -1), cfg.token_layout(tubelet)


def is_hierarchical(cfg: Any) -> bool:
    """Whether the student runs stages of blocks on their own grids and widths (VMamba), not one stack of layers."""
    return getattr(cfg, "depths", None) is not None and hasattr(cfg, "stage_grids")


def scan_elements_per_image(cfg: Any, layout: TokenLayout) -> int:
    """Elements of the largest selective-scan tensor one image makes: tokens × d_inner × d_state, for a hierarchical
    student the largest stage's (its four cross-scans run as one scan of 4 × d_inner channels)."""
    if is_hierarchical(cfg):
        grids, inner = cfg.stage_grids(), cfg.d_inner
        return max(h * w * len(DIRECTIONS) * inner[s] for s, (h, w) in enumerate(grids)) * cfg.d_state
    inner = cfg.d_inner
    return layout.seq_len * (max(inner) if isinstance(inner, tuple) else inner) * cfg.d_state


def _forward(model: torch.nn.Module, cfg: Any, inputs: torch.Tensor, layout: TokenLayout, backend: str) -> MambaOutput:
    """The model's outputs on `inputs`; on a CPU in batches of at most `CPU_SCAN_ELEMENTS` scan elements."""
    per_image = scan_elements_per_image(cfg, layout)
    step = max(1, CPU_SCAN_ELEMENTS // per_image) if inputs.device.type == "cpu" else len(inputs)
    with use_backend(backend), torch.no_grad():
        parts = [model.forward_all(inputs[i : i + step]) for i in range(0, len(inputs), step)]
    return MambaOutput(
        logits=torch.cat([p.logits for p in parts]),
        final_tokens=torch.cat([p.final_tokens for p in parts]),
        layer_tokens=[torch.cat(tokens) for tokens in zip(*(p.layer_tokens for p in parts), strict=True)],
    )


def _images(calib: str | int, cfg: Any, max_images: int, seed: int) -> torch.Tensor:
    """The first `max_images` calibration images at the student's input size.

    Only the images' geometry (size, channels, patch) reaches the calibration reader: the student's widths, one per
    stage for a hierarchical student, are no ViT's."""
    geometry = ViTConfig(
        img_size=cfg.img_size, in_chans=cfg.in_chans, patch_size=cfg.patch_size, embed_dim=1, num_heads=1, mlp_hidden=1
    )
    batches, count = [], 0
    for batch in calibration_batches(calib, geometry, seed=seed, limit=max_images):  # read no more than used
        batches.append(batch[: max_images - count])
        count += len(batches[-1])
        if count >= max_images:
            break
    return torch.cat(batches)


def verify_converted(
    path: str | Path,
    *,
    teacher: Checkpoint | None = None,
    calib: str | int = 8,
    max_images: int = 32,
    seed: int = 0,
    device: str | torch.device = "cpu",
    backends: list[str] | None = None,
    require_teacher: bool = False,
) -> VerifyReport:
    """Verify the model file at `path`; see the module docstring. Never raises for a failed check: the report
    lists the problems (`report.ok`), so callers decide how loud to be. A file that is no converted model raises."""
    path = Path(path)
    loaded = load_model_file(path)
    cfg, metadata = loaded.config, loaded.metadata
    if not is_target_family(loaded.family):
        raise VerificationError(f"{path}: a {loaded.family} model; verify checks converted (Mamba) model files")
    device = torch.device(device)
    student = loaded.model.to(device).eval()
    images = _images(calib, cfg, max_images, seed).to(device)
    inputs, layout = student_view(cfg, images)
    stage = "distilled" if "distill" in metadata else "converted"
    report = VerifyReport(path=str(path), images=len(images), finite=True, backends={}, stage=stage)
    broken = non_finite_tensors(student)
    if broken is not None:
        report.problems.append(f"non-finite weights (NaN or inf) in {broken}")

    # On a CPU, Triton only runs in its interpreter (a debugging aid): compare it there only when asked to.
    usable = backends or [b for b in available_backends(device) if device.type == "cuda" or b != "triton"]
    outputs = {name: _forward(student, cfg, inputs, layout, name) for name in usable}
    ref_name = "reference" if "reference" in outputs else usable[0]
    ref = outputs[ref_name]
    report.finite = all(_finite(out.logits, out.final_tokens) for out in outputs.values())
    if not report.finite:
        report.problems.append("non-finite values in the student's outputs")
        report.backends = dict.fromkeys(outputs)
    else:
        for name, out in outputs.items():
            err = max(_relative_error(out.logits, ref.logits), _relative_error(out.final_tokens, ref.final_tokens))
            report.backends[name] = err
            if not err <= BACKEND_TOLERANCE:  # NaN fails too
                report.problems.append(f"backend {name} differs from {ref_name} by {err:.2e} (> {BACKEND_TOLERANCE:g})")

    if teacher is not None:
        _compare_with_teacher(report, ref, teacher, cfg, layout, metadata, images, path)
        if require_teacher and "final" in report.not_compared:
            report.problems.append(f"no comparison with the teacher: {report.not_compared['final']}")
        if stage == "converted" and len(report.not_compared) < len(MEASURES):
            report.notes.append(NOT_DISTILLED)
    return report


def _compare_with_teacher(
    report: VerifyReport,
    ref: MambaOutput,
    teacher: Checkpoint,
    cfg: Any,
    layout: TokenLayout,
    metadata: dict[str, Any],
    images: torch.Tensor,
    path: Path,
) -> None:
    """Fill the report's teacher measures, or say in `not_compared` why each one could not be made."""
    tcfg = teacher.config
    skip_all = _unrunnable(cfg, tcfg) if report.finite else "the student's outputs are not finite"
    if skip_all is None:
        vit = teacher.model().to(images.device).eval()
        with torch.no_grad():
            tout = vit.forward_all(images)
        if not _finite(tout.logits, tout.final_tokens):
            report.problems.append("non-finite values in the teacher's outputs (its weights or its norm eps)")
            skip_all = "the teacher's outputs are not finite"
    if skip_all is not None:
        report.not_compared = dict.fromkeys(MEASURES, skip_all)
        report.teacher_comparison = "skipped"
        return

    if is_hierarchical(cfg):
        _compare_stages(report, ref, tout, cfg, tcfg, metadata, path)
    elif isinstance(features := _feature_pairing(cfg, layout, tcfg, metadata), str):
        report.not_compared.update(layers=features, final=features)
    else:
        token_index, valid, channels = (x if x is None else x.to(images.device) for x in features)

        def as_student(tokens: torch.Tensor) -> torch.Tensor:
            tokens = tokens[:, token_index]
            return tokens if channels is None else tokens[..., channels]

        plan = _layer_plan(metadata, path)
        if (problem := _plan_problem(plan, tcfg)) is not None:
            report.not_compared["layers"] = problem
        else:
            last: tuple[int, str | None] | None = None
            for j, tokens in enumerate(ref.layer_tokens):
                block, part = plan.get(j, (None, None))
                last = (block, part) if block is not None else last
                if last is None:
                    continue
                # an attention sub-layer ends mid-block; anything else at the end of its (last) teacher block
                reference = tout.mid_tokens[last[0]] if last[1] == "attn" else tout.layer_tokens[last[0]]
                cos = _mean_token_cosine(tokens, as_student(reference), valid)
                report.layers.append(LayerSimilarity(layer=j, block=block, cosine=cos, sublayer=part))
                if not math.isfinite(cos):
                    report.problems.append(f"layer {j}: cosine to teacher block {last[0]} is {cos}")
        report.final_cosine = _mean_token_cosine(ref.final_tokens, as_student(tout.final_tokens), valid)
        if not math.isfinite(report.final_cosine):
            report.problems.append(f"final features: cosine to the teacher is {report.final_cosine}")

    if "head.weight" not in teacher:
        report.not_compared["top1"] = "the teacher has no classifier head"
    elif not cfg.num_classes:
        report.not_compared["top1"] = "the student has no classifier head"
    elif cfg.num_classes != tcfg.num_classes:
        report.not_compared["top1"] = f"the student predicts {cfg.num_classes} classes, the teacher {tcfg.num_classes}"
    else:
        report.top1_agreement = (ref.logits.argmax(-1) == tout.logits.argmax(-1)).double().mean().item()
    report.teacher_comparison = "partial" if report.not_compared else "done"


def _unrunnable(cfg: Any, tcfg: ViTConfig) -> str | None:
    """Why the teacher cannot run on the student's images, or None when it can."""
    height, width = cfg.img_size
    if tcfg.in_chans != cfg.in_chans:
        return f"the teacher reads {tcfg.in_chans}-channel images, the student {cfg.in_chans}-channel ones"
    if height % tcfg.patch_size or width % tcfg.patch_size:
        return f"the student's {height}×{width} images are not whole {tcfg.patch_size}-px patches of the teacher"
    return None


def _feature_pairing(
    cfg: Any, layout: TokenLayout, tcfg: ViTConfig, metadata: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | str:
    """(teacher position of each student token, which student tokens have one, teacher channels the student kept
    or None for all), or why student and teacher features cannot be compared one to one."""
    height, width = cfg.img_size
    teacher_grid = (height // tcfg.patch_size, width // tcfg.patch_size)
    try:
        token_index, valid = layout.positions_in(tcfg.token_layout(teacher_grid))
    except ValueError:
        grid = layout.grid
        return (
            f"the student's {grid[0]}×{grid[1]} patch grid is not the teacher's {teacher_grid[0]}×{teacher_grid[1]} "
            f"at {height}×{width} px, so their tokens do not pair one to one"
        )
    kept = _kept_channels(metadata, cfg.embed_dim, tcfg.embed_dim)
    if kept is None and cfg.embed_dim != tcfg.embed_dim:
        return (
            f"the student is {cfg.embed_dim} channels wide and the teacher {tcfg.embed_dim}, and the file records no "
            "residual channel set that fits this teacher"
        )
    return token_index, valid, None if kept is None else torch.tensor(kept)


def _kept_channels(
    metadata: dict[str, Any], width: int, teacher_width: int, name: str = "residual", *, upto: bool = False
) -> list[int] | None:
    """The teacher residual channels the student kept (the index set `name`), when the file records a set of the
    student's width over a teacher of this width. `upto`: a set narrower than the student also fits (a stage wider
    than the teacher keeps all its channels, `upto: true`; its first channels are the kept ones, the rest new)."""
    index_sets = metadata.get("index_sets")
    residual = index_sets.get(name) if isinstance(index_sets, dict) else None
    indices = residual.get("indices") if isinstance(residual, dict) else None
    kept = next(iter(indices.values()), None) if isinstance(indices, dict) else None
    fits = (
        isinstance(kept, list)
        and (0 < len(kept) <= width if upto else len(kept) == width)
        and residual.get("full") == teacher_width
        and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < teacher_width for c in kept)
        and len(set(kept)) == len(kept)
    )
    return kept if fits else None


def pool_to_grid(tokens: torch.Tensor, grid: tuple[int, int], to: tuple[int, int]) -> torch.Tensor:
    """(B, H·W, C) raster tokens on `grid` -> (B, h·w, C) raster on `to` by area pooling (`F.adaptive_avg_pool2d`,
    which is `F.interpolate`'s 'area'): each target token is the mean of the tokens its area covers, whole windows
    when one side divides the other (a 14x14 teacher grid to a 7x7 stage: 2x2 means), a token repeated over the finer
    grid's tokens under it when the target is finer (a 56x56 stage under 14x14 patches)."""
    if tuple(grid) == tuple(to):
        return tokens
    image = tokens.unflatten(1, tuple(grid)).permute(0, 3, 1, 2)
    return F.adaptive_avg_pool2d(image, tuple(to)).flatten(2).transpose(1, 2)


def pooled_cosine(
    student: torch.Tensor,
    student_grid: tuple[int, int],
    teacher: torch.Tensor,
    teacher_grid: tuple[int, int],
    kept: list[int] | None,
) -> float:
    """Mean over tokens and images of the cosine between a student stage's tokens (B, L_s, C_s) and the teacher's
    patch tokens (B, L_t, D) area-pooled to the stage grid, on the kept channels: student channel i against teacher
    channel kept[i] (i < len(kept): a stage wider than the teacher compares its teacher channels only); `kept`
    None: all channels, one to one."""
    if kept is not None:
        teacher = teacher[..., torch.tensor(kept, device=teacher.device)]
        student = student[..., : len(kept)]
    pooled = pool_to_grid(teacher.double(), teacher_grid, student_grid)
    return F.cosine_similarity(student.double(), pooled, dim=-1).mean().item()


def _stage_channels(cfg: Any, tcfg: ViTConfig, metadata: dict[str, Any]) -> list[list[int] | None] | str:
    """Per stage the teacher channels it kept (`residual@s`; None: all, a stage as wide as the teacher without a
    record), or why a stage's features cannot be compared with the teacher's."""
    channels: list[list[int] | None] = []
    for stage, width in enumerate(cfg.embed_dim):
        kept = _kept_channels(metadata, width, tcfg.embed_dim, f"residual@{stage}", upto=True)
        if kept is None and width != tcfg.embed_dim:
            return (
                f"stage {stage} is {width} channels wide and the teacher {tcfg.embed_dim}, and the file records no "
                f"residual@{stage} channel set that fits this teacher"
            )
        channels.append(kept)
    return channels


def _plan_problem(plan: dict[int, tuple[int, str | None]], tcfg: ViTConfig) -> str | None:
    """Why the file's layer plan gives no layer comparison with this teacher, or None when it does."""
    beyond = sorted(b for b, _ in plan.values() if b >= tcfg.depth)
    if beyond:
        return f"the file's layer plan names teacher block {beyond[-1]}; this teacher's last is {tcfg.depth - 1}"
    if not plan:
        return "no student layer was initialised from a teacher block (layer plan)"
    return None


def _compare_stages(
    report: VerifyReport,
    ref: MambaOutput,
    tout: Any,
    cfg: Any,
    tcfg: ViTConfig,
    metadata: dict[str, Any],
    path: Path,
) -> None:
    """A hierarchical student's layer and final cosines (see the module docstring): each block of stage s against
    its teacher block's patch tokens area-pooled to the stage grid, on the stage's kept channels."""
    channels = _stage_channels(cfg, tcfg, metadata)
    if isinstance(channels, str):
        report.not_compared.update(layers=channels, final=channels)
        return
    height, width = cfg.img_size
    teacher_grid = (height // tcfg.patch_size, width // tcfg.patch_size)
    patches = torch.tensor(tcfg.token_layout(teacher_grid).patch_indices, device=ref.final_tokens.device)
    grids, stages = cfg.stage_grids(), cfg.block_stages()
    starts = [sum(cfg.depths[:s]) for s in range(len(cfg.depths))]

    plan = _layer_plan(metadata, path)
    if (problem := _plan_problem(plan, tcfg)) is not None:
        report.not_compared["layers"] = problem
    else:
        for j, tokens in enumerate(ref.layer_tokens):
            stage = stages[j]
            where = {"stage": stage, "stage_block": j - starts[stage]}
            if j not in plan:
                report.layers_not_compared.append(LayerSimilarity(layer=j, block=None, cosine=0.0, **where).label)
                continue
            block, part = plan[j]
            reference = tout.mid_tokens[block] if part == "attn" else tout.layer_tokens[block]
            cos = pooled_cosine(tokens, grids[stage], reference[:, patches], teacher_grid, channels[stage])
            similarity = LayerSimilarity(layer=j, block=block, cosine=cos, sublayer=part, **where)
            report.layers.append(similarity)
            if not math.isfinite(cos):
                report.problems.append(f"{similarity.label}: cosine to teacher block {block} is {cos}")
    last = len(grids) - 1
    report.final_cosine = pooled_cosine(
        ref.final_tokens, grids[last], tout.final_tokens[:, patches], teacher_grid, channels[last]
    )
    if not math.isfinite(report.final_cosine):
        report.problems.append(f"final features: cosine to the teacher is {report.final_cosine}")


def _layer_plan(metadata: dict[str, Any], path: Path) -> dict[int, tuple[int, str | None]]:
    """Student layer -> the teacher block it was initialised from and the sub-layer ("attn" / "mlp"; None: the whole
    block), default-initialised layers left out."""
    rows = metadata.get("layer_plan", [])
    if not (isinstance(rows, list) and all(isinstance(row, dict) for row in rows)):
        raise VerificationError(f"{path}: its layer_plan metadata is not a list of {{layer, block}} rows")
    plan = {}
    for row in rows:
        layer, block = row.get("layer"), row.get("block")
        if block is None:
            continue
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (layer, block)):
            raise VerificationError(f"{path}: its layer_plan metadata has the row {row!r}; expected whole numbers")
        part = row.get("sublayer")
        if part not in (None, "attn", "mlp"):
            raise VerificationError(f"{path}: its layer_plan metadata has the row {row!r}; sublayer is attn or mlp")
        plan[layer] = (block, part)
    return plan
