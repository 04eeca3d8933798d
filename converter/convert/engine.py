"""Applying a plan: choose the index sets, stream the target tensors into the output, report.

The flow is `prepare` (load the mapping, open the checkpoint, check the output paths against it, derive the target
config, build and check the plan: everything that can fail cheaply fails here) and then `execute` (hash the source,
score and choose the index sets, initialise the target once, evaluate each planned tensor and write it as soon as it
exists).

Memory: the source is never loaded as a whole. Each target tensor reads only the source tensors its expression
names (cached for that one tensor, e.g. fc1 read once for both in_proj halves) and is written and dropped before the
next. The default-initialised target is built once with its upstream init (a seeded model of its family), which
costs the target's fp32 size; a student is small next to the ViT it shrinks from, and building it whole is what makes
the initialisation bit-identical to upstream's (its init draws are sequential). Activation scoring loads the teacher
once, before conversion starts, and frees it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tmconvert.converter import dtypes
from tmconvert.converter.checkpoint import Checkpoint, open_checkpoint
from tmconvert.converter.checkpoint.formats import HF_WEIGHT_FILES
from tmconvert.converter.configs import config_json, derive_target_config, target_base
from tmconvert.converter.convert.fit import LayerFit, fit_layers
from tmconvert.converter.convert.subclone import SCORE_METHODS, Selection, activation_scores, choose
from tmconvert.converter.data.calibration import calibration_batches, parse_calib
from tmconvert.converter.errors import ConfigError
from tmconvert.converter.mapping.files import LoadedMapping, default_mapping_for, find_mapping, load_mapping
from tmconvert.converter.mapping.fits import FITS
from tmconvert.converter.mapping.interpret import EvalContext, FitNode, OpContext, Region, evaluate, walk
from tmconvert.converter.modelfile.converted import (
    OutputPaths,
    encode_metadata,
    header_fields,
    load_converted,
    upstream_container,
    write_model_file,
)
from tmconvert.converter.modelfile.files import check_writable, sha256_files
from tmconvert.converter.modelfile.safetensors import TensorSpec
from tmconvert.converter.plan.plan import Plan, PlanEntry, SourceSide, TargetSide, build_plan
from tmconvert.converter.verify.numeric import VerificationError, VerifyReport, verify_converted
from tmconvert.models import build_model, family_of

# `upstream` adds the `.pth` the target family's upstream code loads (`modelfile.upstream_container`); `vim`, its
# name from when ViM was the only target, is the same format.
FORMATS = ("safetensors", "upstream", "vim")
UPSTREAM_FORMATS = ("upstream", "vim")
VERIFY_IMAGES = 8  # synthetic images the post-conversion check runs when no calibration folder was given


@dataclass(frozen=True)
class ConvertRequest:
    """Everything `tmconvert SOURCE --to TARGET ...` was asked to do."""

    source: Path
    target: str
    mapping: str | None = None  # file path or shipped name; None: the target's default
    layers: int | None = None
    identity_rest: bool | None = None  # None: the mapping's `options.identity_rest`
    calib: str | None = None  # folder of images or a count of synthetic images
    score: str | None = None  # None: activation with --calib, else magnitude
    out: Path | None = None
    dtype: str = "fp32"
    seed: int = 0
    force: bool = False
    format: str = "safetensors"
    img_size: int | None = None
    patch_size: int | None = None
    num_classes: int | None = None
    ema: bool = False
    num_heads: int | None = None
    verify: bool = True


@dataclass
class Prepared:
    """A checked plan ready to run, with the open checkpoint it reads from."""

    request: ConvertRequest
    checkpoint: Checkpoint
    mapping: LoadedMapping
    plan: Plan
    paths: OutputPaths
    score: str
    calib: str | int | None

    def close(self) -> None:
        self.checkpoint.close()


@dataclass
class ConversionResult:
    paths: OutputPaths
    plan: Plan
    bytes_written: int
    source_sha256: str
    seconds: float
    selection: Selection
    metadata: dict[str, str]
    verification: dict[str, Any] | None = None
    verify_report: VerifyReport | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)


def default_output_path(source: Path, target: str) -> Path:
    """`<source stem>-<target>.safetensors` in the current folder."""
    stem = source.name if source.is_dir() else source.name.split(".")[0]
    return Path.cwd() / f"{stem}-{target}.safetensors"


def prepare(request: ConvertRequest, *, check_outputs: bool = True) -> Prepared:
    """Open, plan and check everything cheap; raises a `TmconvertError` naming the problem."""
    if request.format not in FORMATS:
        raise ConfigError(f"--format {request.format}: choose one of {', '.join(FORMATS)}")
    score = request.score or ("activation" if request.calib is not None else "magnitude")
    if score not in SCORE_METHODS:
        raise ConfigError(f"--score {score}: choose one of {', '.join(SCORE_METHODS)}")
    calib = parse_calib(request.calib)
    if score == "activation" and calib is None:
        raise ConfigError("--score activation needs calibration images: --calib DIR or --calib N (synthetic)")

    out = request.out or default_output_path(request.source, request.target)
    family = family_of(target_base(request.target))  # a name that is no conversion target fails here, first
    container = upstream_container(family) if request.format in UPSTREAM_FORMATS else None
    paths = OutputPaths.for_weights(out, pth_container=container)
    mapping_path = find_mapping(request.mapping) if request.mapping else default_mapping_for(request.target)
    mapping = load_mapping(mapping_path)
    checkpoint = open_checkpoint(request.source, ema=request.ema, num_heads=request.num_heads)
    try:
        if check_outputs:
            check_writable(paths.all(), force=request.force, inputs=_inputs(checkpoint, mapping))
        target_cfg = derive_target_config(
            request.target,
            checkpoint.config,
            img_size=request.img_size,
            patch_size=request.patch_size,
            num_classes=request.num_classes,
        )
        options = {
            "score": score,
            "calib": calib,
            "seed": request.seed,
            "format": request.format,
            "ema": request.ema,
        }
        plan = build_plan(
            mapping,
            SourceSide.from_checkpoint(checkpoint),
            TargetSide.from_config(request.target, target_cfg),
            layers=request.layers,
            identity_rest=request.identity_rest,
            dtype=request.dtype,
            options=options,
        )
        plan.raise_problems()
        if plan.needs_fit and calib is None:
            raise ConfigError(
                f"mapping {mapping.name} fits its layers on calibration images: pass --calib with real images of "
                "the task (a folder, fashion-mnist), or --mapping vit-vim-mlp for a conversion without data"
            )
        if plan.needs_fit and isinstance(calib, int):
            plan.warnings.append(
                f"mapping {mapping.name} is fitted on {calib} synthetic noise images: real images (--calib DIR) "
                "give a much closer start (on DINOv2: layer cosine 0.81 against 0.16)"
            )
    except BaseException:
        checkpoint.close()
        raise
    return Prepared(request, checkpoint, mapping, plan, paths, score, calib)


def _inputs(checkpoint: Checkpoint, mapping: LoadedMapping) -> list[Path]:
    """Every file a conversion reads, which no output may be: the weights (all shards), the file or folder named
    (a shard index; a model folder's weight and index files), its config.json, the mapping."""
    path = checkpoint.path
    in_folder = [path / name for name in HF_WEIGHT_FILES] if path.is_dir() else []
    config = [checkpoint.config_file] if checkpoint.config_file is not None else []
    return [*checkpoint.files, path, *in_folder, *config, mapping.path]


def choose_index_sets(prepared: Prepared) -> Selection:
    """Score and choose every index set of the plan (identity selections need no scores)."""
    plan, ckpt = prepared.plan, prepared.checkpoint
    index_sets = list(plan.index_sets.values())
    scored = [s for s in index_sets if s.keep < s.full]
    activations = None
    if scored and prepared.score == "activation":
        teacher = ckpt.model()
        batches = calibration_batches(prepared.calib, ckpt.config, seed=prepared.request.seed)
        activations = activation_scores(scored, teacher, batches)
        del teacher
    return choose(index_sets, prepared.score, get=ckpt.get, cfg=ckpt.config, activations=activations)


def fit_planned_layers(prepared: Prepared, selection: Selection) -> dict[str, torch.Tensor]:
    """Solve every layer the plan fits (`fit:` rules) on the calibration images, at the student's image size."""
    plan, ckpt = prepared.plan, prepared.checkpoint
    fits: dict[int, LayerFit] = {}
    for entry in plan.entries:
        for node, _ in walk(entry.node):
            if isinstance(node, FitNode) and entry.layer is not None and entry.layer not in fits:
                residual_set, kept_set = FITS[node.fit].sets
                fits[entry.layer] = LayerFit(
                    entry.layer, node.block, node.fit, selection[residual_set][None], selection[kept_set][node.block]
                )
    if not fits:
        return {}
    target = plan.target.config
    calib_cfg = dataclasses.replace(ckpt.config, img_size=target.img_size)
    batches = list(calibration_batches(prepared.calib, calib_cfg, seed=prepared.request.seed))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return fit_layers(ckpt.model(), list(fits.values()), batches, target, seed=prepared.request.seed, device=device)


def iter_target_tensors(
    plan: Plan,
    entries: list[PlanEntry],
    load: Callable[[str], torch.Tensor],
    selection: Selection,
    default_state: dict[str, torch.Tensor] | None,
    fitted: dict[str, torch.Tensor] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Evaluate the planned tensors one at a time (the same `evaluate` the plan ran on meta tensors)."""
    configs = {"source": plan.source.config, "target": plan.target.config}

    def default(name: str) -> torch.Tensor:
        if default_state is None:
            raise RuntimeError("the plan has no default-initialised tensors")  # plan.needs_default_init said so
        return default_state[name]

    for entry in entries:
        once = _OncePerEntry(load)
        ops_ctx = OpContext(
            configs, plan.index_sets, lambda s, b: selection[s][b], entry.block, load=once, stage=entry.stage
        )
        ctx = EvalContext(once, default, ops_ctx, meta=False, fitted=(fitted or {}).__getitem__)
        tensor = evaluate(entry.node, ctx, Region(entry.name, entry.shape))
        yield entry.name, tensor.to(dtypes.storable(entry.dtype).torch).contiguous()


class _OncePerEntry:
    """Source tensors read at most once while one target tensor is built (fc1 feeds both in_proj halves)."""

    def __init__(self, load: Callable[[str], torch.Tensor]):
        self._load = load
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            self._cache[name] = self._load(name).float()
        return self._cache[name]


def build_metadata(prepared: Prepared, selection: Selection, source_sha256: str) -> dict[str, str]:
    """The converted file's metadata: the model-file header fields, then what the conversion did."""
    plan, ckpt, request = prepared.plan, prepared.checkpoint, prepared.request
    index_sets = {
        name: {
            "full": s.full,
            "keep": s.keep,
            "per": s.per,
            "score": s.score,
            "indices": {str(b): selection[name][b].tolist() for b in s.blocks},
        }
        for name, s in plan.index_sets.items()
    }
    return encode_metadata(
        {
            **header_fields(plan.target.name, plan.target.config),
            "mapping": prepared.mapping.name,
            "mapping_sha256": prepared.mapping.sha256,
            "source": ckpt.path.name,
            "source_sha256": source_sha256,
            "source_format": ckpt.format,
            "source_config": config_json(ckpt.config),
            "options": {
                **plan.options,
                "calib": str(prepared.calib) if prepared.calib is not None else None,
            },
            "seed": str(request.seed),
            "layer_plan": plan.layers.to_json(),
            "index_sets": index_sets,
            "counts": plan.counts(),
        }
    )


def execute(
    prepared: Prepared,
    *,
    on_stage: Callable[[str], None] | None = None,
    on_tensor: Callable[[str, int], None] | None = None,
) -> ConversionResult:
    """Run a prepared conversion; the output files appear only if everything succeeded."""
    start = time.perf_counter()
    stages: dict[str, float] = {}
    plan, ckpt, request = prepared.plan, prepared.checkpoint, prepared.request

    def stage(name: str) -> None:
        stages[name] = time.perf_counter()
        if on_stage is not None:
            on_stage(name)

    stage("hashing source")
    source_sha256 = sha256_files(ckpt.files)
    stage("choosing channels")
    selection = choose_index_sets(prepared)
    fitted = None
    if plan.needs_fit:
        stage("fitting layers")
        fitted = fit_planned_layers(prepared, selection)
    stage("initialising target")
    default_state = None
    if plan.needs_default_init:
        default_state = build_model(plan.target.config, seed=request.seed).state_dict()
    metadata = build_metadata(prepared, selection, source_sha256)
    stage("writing")
    order = plan.write_order()
    specs = [TensorSpec(e.name, e.shape, e.dtype) for e in order]
    stream = iter_target_tensors(plan, order, ckpt.get, selection, default_state, fitted)
    written = write_model_file(
        prepared.paths,
        specs,
        stream,
        metadata,
        overwrite=request.force,
        pth_order=[e.name for e in plan.entries],
        pth_dtypes=_integer_tensors(plan.target.config) if prepared.paths.pth is not None else None,
        on_tensor=on_tensor,
    )
    stage("done")
    result = ConversionResult(
        paths=prepared.paths,
        plan=plan,
        bytes_written=written,
        source_sha256=source_sha256,
        seconds=time.perf_counter() - start,
        selection=selection,
        metadata=metadata,
        stage_seconds=_durations(stages),
    )
    if request.verify:
        if on_stage is not None:
            on_stage("verifying")
        began = time.perf_counter()
        result.verification = verify_conversion(result, prepared)
        result.stage_seconds["verifying"] = time.perf_counter() - began
    return result


def _integer_tensors(config: Any) -> dict[str, torch.dtype]:
    """The model's tensors that are not floats (BatchNorm's `num_batches_tracked`): the upstream `.pth` restores
    their dtype, where the model file stores every tensor as a float."""
    state = build_model(config, device="meta").state_dict()
    return {name: tensor.dtype for name, tensor in state.items() if not tensor.is_floating_point()}


def verify_conversion(result: ConversionResult, prepared: Prepared) -> dict[str, Any]:
    """THE verification hook: runs after every conversion unless --no-verify.

    Structure first (the written file reloads into its model with strict keys and shapes; the `.pth` of
    `--format upstream` holds the same keys in its family's container), then numbers (`verify.numeric`): a forward on
    the calibration images (or synthetic ones) on the best device, finite outputs, agreement of the scan backends
    usable there, per-layer cosine to the teacher and top-1 agreement. A failed check raises `VerificationError`; the
    files stay for inspection.
    """
    cfg, state, _ = load_converted(result.paths.weights)
    model = build_model(cfg, device="meta")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise VerificationError(
            f"{result.paths.weights}: does not load into {type(model).__name__} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    report: dict[str, Any] = {"keys": len(state), "strict_load": True}
    if result.paths.pth is not None:
        pth = torch.load(result.paths.pth, map_location="cpu", weights_only=True)
        if set(pth.get(result.paths.container, {})) != set(state):
            raise VerificationError(f"{result.paths.pth}: keys differ from {result.paths.weights}")
        report["pth_keys"] = len(pth[result.paths.container])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    numeric = verify_converted(
        result.paths.weights,
        teacher=prepared.checkpoint,
        calib=prepared.calib if prepared.calib is not None else VERIFY_IMAGES,
        seed=prepared.request.seed,
        device=device,
    )
    report["numeric"] = numeric.to_json()
    result.verify_report = numeric
    if not numeric.ok:
        raise VerificationError(
            f"{result.paths.weights}: written, but verification failed: {'; '.join(numeric.problems)}"
        )
    return report


def _durations(marks: dict[str, float]) -> dict[str, float]:
    names = list(marks)
    return {names[i]: round(marks[names[i + 1]] - marks[names[i]], 4) for i in range(len(names) - 1)}


def convert(request: ConvertRequest, **callbacks: Any) -> ConversionResult:
    """`prepare` + `execute` in one call (library entry point)."""
    prepared = prepare(request)
    try:
        return execute(prepared, **callbacks)
    finally:
        prepared.close()


__all__ = [
    "ConversionResult",
    "ConvertRequest",
    "Prepared",
    "convert",
    "execute",
    "prepare",
    "verify_conversion",
]
