"""Where the time of one distillation step goes: ViM-T/S/B students at 224 and 112 px against a DeiT-shaped teacher.

    source benchmarks/device_env.sh && python3 benchmarks/distill_profile.py [--json profile.json]
    python3 benchmarks/distill_profile.py --students vim-s --img-sizes 224 --batch-size 64     # one configuration
    python3 benchmarks/distill_profile.py --smoke                                              # CPU check, seconds

For each (student, image size) it builds a teacher of `--teacher`'s shape (random weights: time does not depend on
their values; patch 16) and the from-scratch student that reads the teacher's images, the default recipe's loss
(CE + KD + adaptive multi-directional feature alignment on the even layer pairing) and the library's own step
(`converter.distill.trainer.Trainer`), on one batch already on the device (random images and labels), and measures:

1. the whole step: the CUDA-graph step (`run.cuda_graph=true`, GPU only) and the eager step (`false`), each after
   warm-up steps (Triton compilation, autotuning, graph capture), the median of `--steps` timed steps (CUDA events
   on the GPU, perf_counter on the CPU), as ms and img/s;
2. the eager step split into its parts, timed on the same batch (median over `--steps` steps): teacher forward,
   student forward + loss, backward (with zero_grad), gradient clipping + AdamW step. The parts are
   `Trainer._compute` written out with the trainer's own autocast settings; CUDA events between them add no
   synchronisation, so the parts sum to about the whole eager step;
3. the student's GPU kernel time by kind: `torch.profiler` over `--profile-steps` eager student steps (forward +
   loss, backward, clipping, AdamW; the teacher's outputs computed once beforehand), every CUDA kernel's self
   device time put in the first bucket whose pattern its name matches (`KERNEL_KINDS`: our Triton selective scan,
   the depthwise causal conv, GEMMs, norms, the optimizer's multi-tensor kernels (gradient clipping's norm included),
   copies / casts, everything else), as ms per step and % of the student's kernel total. The patch embedding's
   convolution also lands under "causal conv" when cuDNN runs it as a convolution kernel (its share is small);
4. the data pipeline alone: the library's training loader (`ImageDataset` + `train_batches`, the recipe's
   augmentation, `--workers` processes, pinned memory on CUDA) on `--data`, `--data-batches` batches timed after
   `--data-warmup`, as img/s, and its ratio to the step's img/s (the CUDA-graph step where there is one): below 1
   the loader, not the GPU, sets the pace of a run with that many workers. Measured once per image size (it does
   not depend on the student), and after the GPU work, so the two never compete for the CPU.

How to read it: one markdown table per configuration (the parts with their share of the eager step, the whole-step
rates, the loader's rate and ratio, then the kernel kinds), and a summary table. The header names the card, torch
and triton versions, the scan backend `tmconvert.kernels.resolve_backend` picks for the device (the kernel table
shows which scan kernels actually ran), amp and batch. `--json FILE` writes
every number. A configuration that runs out of GPU memory is reported as such and the others go on.

CPU mode (`--device cpu`, or no GPU; `--smoke` = tiny models via registry overrides, 32 px, 2 timed steps): there
is no CUDA-graph step (null in the JSON, "n/a" in the tables), times are perf_counter intervals, and the kernel
table buckets the CPU profiler's operators (self CPU time of each aten / autograd / optimizer op) by the same kinds
with CPU op names (matmul / addmm / linear as GEMM, foreach / Optimizer as optimizer). The reference scan is plain
PyTorch there, so its time shows up as "other" (elementwise), not as selective scan, and so does the causal conv (on
the CPU it is shifted multiply-adds): "causal conv" there is the patch embedding's conv2d and its backward. The
loader ratio compares against the eager step. It checks the script, not the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
import yaml
from torch import nn

from tmconvert.converter.configs import derive_target_config
from tmconvert.converter.data.loaders import ImageDataset, train_batches
from tmconvert.converter.data.preprocess import InputSpec, Preprocess
from tmconvert.converter.data.sources import open_source
from tmconvert.converter.distill.processes import init_distributed
from tmconvert.converter.distill.recipe import Recipe, load_recipe
from tmconvert.converter.distill.run import even_pairs
from tmconvert.converter.distill.trainer import GRAPH_WARMUP_STEPS, Trainer, build_loss
from tmconvert.kernels import resolve_backend
from tmconvert.models import build_model

PARTS = ("teacher_forward", "student_forward_loss", "backward", "clip_adamw")
PART_LABELS = {
    "teacher_forward": "teacher forward",
    "student_forward_loss": "student forward + loss",
    "backward": "backward",
    "clip_adamw": "clipping + AdamW",
}

# (kind, pattern on the CUDA kernel name, pattern on the CPU operator name); the first match wins, "other" catches
# the rest. Our scan kernels: selective_scan_{fwd,bwd}_kernel (kernels/selective_scan_triton_*.py); mamba-ssm's are
# selective_scan_*_kernel too. The causal conv (kernels/conv1d.py) is F.conv1d with groups=channels on CUDA.
KERNEL_KINDS: tuple[tuple[str, str, str], ...] = (
    ("selective scan", r"selective_scan", r"selective_scan"),
    ("causal conv", r"conv|depthwise|fprop|dgrad|wgrad", r"conv"),
    ("GEMM", r"gemm|cutlass|xmma|nvjet|sm90|cublas", r"\bmm\b|addmm|bmm|matmul|linear|gemm|aten::mm"),
    ("optimizer", r"adam|multi_tensor|foreach", r"adam|foreach|multi_tensor|optimizer"),
    ("norms", r"rms|layer_norm|norm", r"rms|layer_norm|norm"),
    ("copies / casts", r"memcpy|memset|copy|cast|convert", r"copy|clone|contiguous|aten::to\b|cast|cat\b|stack"),
)
OTHER_KIND = "other (elementwise, reductions)"
KIND_NAMES = (*(kind for kind, _, _ in KERNEL_KINDS), OTHER_KIND)

FULL_DEFAULTS: dict[str, Any] = {
    "students": "vim-t,vim-s,vim-b",
    "img_sizes": "224,112",
    "batch_size": 128,
    "steps": 30,
    "warmup": 10,
    "profile_steps": 3,
    "data": "synthetic:8192",
    "data_batches": 40,
    "data_warmup": 4,
    "num_classes": 1000,
    "workers": None,  # min(8, usable CPUs)
    "teacher_set": [],
    "student_set": [],
}
SMOKE_DEFAULTS: dict[str, Any] = {
    **FULL_DEFAULTS,
    "students": "vim-t",
    "img_sizes": "32",
    "batch_size": 4,
    "steps": 2,
    "warmup": 1,
    "profile_steps": 1,
    "data": "synthetic:16",
    "data_batches": 2,
    "data_warmup": 1,
    "num_classes": 10,
    "workers": 0,
    "teacher_set": ["depth=2", "embed_dim=32", "num_heads=2", "mlp_hidden=64", "patch_size=8"],
    "student_set": ["depth=2", "embed_dim=16", "d_state=4"],
}


# -- timing ------------------------------------------------------------------------------------------------------


class Marks:
    """Points on the device's timeline: CUDA events on the current stream (no synchronisation until read), or
    perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.points: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points.append(event)
        else:
            self.points.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive marks."""
        pairs = zip(self.points, self.points[1:], strict=False)
        if self.cuda:
            torch.cuda.synchronize()
            return [float(a.elapsed_time(b)) for a, b in pairs]
        return [1000.0 * (b - a) for a, b in pairs]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(batch: int, ms: float) -> float:
    return batch / (ms / 1000.0)


def _autocast(trainer: Trainer) -> dict[str, Any]:
    """The autocast settings of `Trainer._compute`."""
    return {"dtype": torch.bfloat16, "enabled": trainer.amp, "cache_enabled": not trainer.cuda_graph}


def time_whole_steps(
    trainer: Trainer, images: torch.Tensor, labels: torch.Tensor, warmup: int, steps: int
) -> dict[str, Any]:
    """Median ms and img/s of `steps` `train_step`s after `warmup` untimed ones."""
    device = trainer.dist.device
    for _ in range(warmup):
        trainer.train_step(images, labels)
    _sync(device)
    marks = Marks(device)
    marks.mark()
    for _ in range(steps):
        trainer.train_step(images, labels)
        marks.mark()
    times = marks.intervals_ms()
    ms = statistics.median(times)
    return {"ms": ms, "img_per_s": _rate(images.shape[0], ms), "ms_all": times}


def time_parts(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor, steps: int) -> dict[str, Any]:
    """`Trainer._compute` (eager) written out with marks between its parts; median ms of each over `steps` steps."""
    device = trainer.dist.device
    autocast = _autocast(trainer)
    samples: dict[str, list[float]] = {part: [] for part in PARTS}
    for _ in range(steps):
        marks = Marks(device)
        marks.mark()
        with torch.no_grad(), torch.autocast(device.type, **autocast):
            teacher_logits, teacher_layers = trainer.targets(trainer.teacher, images)
        marks.mark()
        with torch.autocast(device.type, **autocast):
            loss = trainer.model(images, teacher_logits, teacher_layers, labels, None)
        marks.mark()
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        marks.mark()
        if trainer.recipe.optim.grad_clip > 0:
            nn.utils.clip_grad_norm_(trainer.module.parameters(), trainer.recipe.optim.grad_clip)
        trainer.optimizer.step()
        marks.mark()
        trainer.scheduler.step()
        for part, ms in zip(PARTS, marks.intervals_ms(), strict=True):
            samples[part].append(ms)
        del loss, teacher_logits, teacher_layers
    parts = {part: statistics.median(values) for part, values in samples.items()}
    return {"ms": parts, "ms_all": samples, "sum_ms": sum(parts.values())}


# -- kernel kinds ------------------------------------------------------------------------------------------------


def kernel_kind(name: str, on_cuda: bool) -> str:
    """The `KERNEL_KINDS` bucket of a CUDA kernel (or, `on_cuda` False, a CPU operator) name."""
    lowered = name.lower()
    for kind, cuda_pattern, cpu_pattern in KERNEL_KINDS:
        if re.search(cuda_pattern if on_cuda else cpu_pattern, lowered):
            return kind
    return OTHER_KIND


def bucket_times(times: Sequence[tuple[str, float]], steps: int, on_cuda: bool) -> dict[str, Any]:
    """(name, self time in µs summed over `steps` steps) → ms per step and % of the total, by kind."""
    totals = dict.fromkeys(KIND_NAMES, 0.0)
    for name, micros in times:
        if micros > 0:
            totals[kernel_kind(name, on_cuda)] += micros
    whole = sum(totals.values())
    kinds = {
        kind: {"ms": micros / 1000.0 / steps, "percent": 100.0 * micros / whole if whole else 0.0}
        for kind, micros in totals.items()
    }
    return {
        "source": "cuda kernels" if on_cuda else "cpu operators",
        "total_ms": whole / 1000.0 / steps,
        "kinds": kinds,
    }


def profile_student(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor, steps: int) -> dict[str, Any]:
    """Kernel time by kind of `steps` eager student steps (forward + loss, backward, clipping, AdamW) on teacher
    outputs computed once beforehand."""
    from torch.profiler import ProfilerActivity, profile

    device = trainer.dist.device
    on_cuda = device.type == "cuda"
    autocast = _autocast(trainer)
    with torch.no_grad(), torch.autocast(device.type, **autocast):
        teacher_logits, teacher_layers = trainer.targets(trainer.teacher, images)

    def step() -> None:
        with torch.autocast(device.type, **autocast):
            loss = trainer.model(images, teacher_logits, teacher_layers, labels, None)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        if trainer.recipe.optim.grad_clip > 0:
            nn.utils.clip_grad_norm_(trainer.module.parameters(), trainer.recipe.optim.grad_clip)
        trainer.optimizer.step()

    step()  # outside the profile: nothing left to compile or allocate for the first time
    _sync(device)
    activity = ProfilerActivity.CUDA if on_cuda else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    times = []
    for event in prof.key_averages():
        if on_cuda:
            micros = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)
        else:
            micros = event.self_cpu_time_total
        times.append((event.key, float(micros)))
    return bucket_times(times, steps, on_cuda)


# -- models, trainers, data --------------------------------------------------------------------------------------


def parse_settings(items: Sequence[str], option: str) -> dict[str, Any]:
    """KEY=VALUE config overrides (values read as YAML: 2, 0.5, true, [32, 32])."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"{option} {item}: expected KEY=VALUE, e.g. {option} depth=2")
        out[key.strip()] = yaml.safe_load(value)
    return out


class Setup:
    """The run's options and process, and how it builds each configuration's trainer."""

    def __init__(self, args: argparse.Namespace, dist: Any):
        self.args, self.dist = args, dist
        self.teacher_set = parse_settings(args.teacher_set, "--teacher-set")
        self.student_set = parse_settings(args.student_set, "--student-set")

    def recipe(self, cuda_graph: bool) -> Recipe:
        flags = {"batch_size": self.args.batch_size, "run.cuda_graph": cuda_graph}
        return load_recipe(None, list(self.args.set), flags).recipe

    def trainer(self, student_name: str, img_size: int, cuda_graph: bool) -> Trainer:
        recipe = self.recipe(cuda_graph)
        overrides = {"num_classes": self.args.num_classes, **self.teacher_set}
        teacher = build_model(self.args.teacher, img_size=(img_size, img_size), seed=0, **overrides)
        student_cfg = derive_target_config(student_name, teacher.cfg)
        student_cfg = dataclasses.replace(student_cfg, drop_path_rate=recipe.student.drop_path, **self.student_set)
        student = build_model(student_cfg, seed=0)
        torch.manual_seed(recipe.seed)  # projectors, as run.py draws them
        pairs = even_pairs(student_cfg.depth, teacher.cfg.depth)
        loss = build_loss(recipe, student, teacher.cfg, pairs)
        return Trainer(teacher, student, loss, recipe, self.dist)


def batch_for(trainer: Trainer, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = trainer.teacher.cfg
    device = trainer.dist.device
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(batch, cfg.in_chans, *cfg.img_size, device=device, generator=gen)
    labels = torch.randint(0, max(cfg.num_classes, 1), (batch,), device=device, generator=gen)
    return images, labels


def measure_data(setup: Setup, img_size: int, step_hint: Recipe) -> dict[str, Any]:
    """img/s of the training loader alone: `data_batches` batches after `data_warmup` (worker start-up)."""
    args, recipe = setup.args, step_hint
    num_classes = args.num_classes
    source = open_source(args.data, split="train", img_size=(img_size, img_size), num_classes=num_classes)
    channels = int(setup.teacher_set.get("in_chans", 3))
    spec = InputSpec.for_model((img_size, img_size), channels)
    preprocess = Preprocess(
        spec,
        train=True,
        augment=recipe.data.augment,
        hflip=recipe.data.hflip,
        scale=recipe.data.scale,
        pad=recipe.data.pad,
    )
    dataset = ImageDataset(source, preprocess, seed=recipe.seed)
    batches = train_batches(
        dataset,
        batch_per_rank=args.batch_size,
        seed=recipe.seed,
        workers=args.workers,
        pin_memory=setup.dist.device.type == "cuda",
    )
    for _ in range(args.data_warmup):
        next(batches)
    start = time.perf_counter()
    for _ in range(args.data_batches):
        images, _labels = next(batches)
    seconds = time.perf_counter() - start
    batches.close()  # ends the loader's worker processes
    return {
        "img_per_s": args.data_batches * args.batch_size / seconds,
        "ms_per_batch": 1000.0 * seconds / args.data_batches,
        "batches": args.data_batches,
        "workers": args.workers,
        "data": args.data,
        "source": source.identity(),
        "augment": preprocess.mode,
        "image_shape": list(images.shape[1:]),
    }


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def profile_configuration(setup: Setup, student_name: str, img_size: int) -> dict[str, Any]:
    """Whole steps (graph, eager), the eager step's parts and the student's kernel kinds of one configuration."""
    args, device = setup.args, setup.dist.device
    result: dict[str, Any] = {"student": student_name, "img_size": img_size, "batch": args.batch_size}
    result["graph_step"] = None
    if device.type == "cuda":
        trainer = setup.trainer(student_name, img_size, cuda_graph=True)
        images, labels = batch_for(trainer, args.batch_size)
        warmup = max(args.warmup, GRAPH_WARMUP_STEPS + 2)  # eager steps, the capture, then replays
        result["graph_step"] = time_whole_steps(trainer, images, labels, warmup, args.steps)
        del trainer, images, labels
        _free(device)
    trainer = setup.trainer(student_name, img_size, cuda_graph=False)
    images, labels = batch_for(trainer, args.batch_size)
    trainer.train_step(images, labels)
    result["tokens"] = int(trainer.student.cfg.num_patches)
    result["amp_bf16"] = trainer.amp
    result["student_params"] = sum(p.numel() for p in trainer.student.parameters())
    result["eager_step"] = time_whole_steps(trainer, images, labels, max(args.warmup - 1, 0), args.steps)
    result["parts"] = time_parts(trainer, images, labels, args.steps)
    result["kernels"] = profile_student(trainer, images, labels, args.profile_steps)
    del trainer, images, labels
    _free(device)
    return result


# -- report ------------------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:,.{digits}f}"


def step_rate(result: dict[str, Any]) -> float:
    """The step's img/s the loader must keep up with: the CUDA-graph step where there is one, else the eager."""
    best = result["graph_step"] or result["eager_step"]
    return best["img_per_s"]


def configuration_table(result: dict[str, Any]) -> str:
    parts, total = result["parts"]["ms"], result["parts"]["sum_ms"]
    eager, graph, data = result["eager_step"], result["graph_step"], result["data"]
    lines = [
        f"### {result['student']}, {result['img_size']} px ({result['tokens']} patches), batch {result['batch']}",
        "",
        "| part | ms / step | share of the parts | img/s |",
        "| --- | --: | --: | --: |",
    ]
    for part in PARTS:
        share = 100.0 * parts[part] / total if total else float("nan")
        lines.append(f"| {PART_LABELS[part]} | {_fmt(parts[part], 2)} | {_fmt(share)} % | |")
    lines.append(f"| sum of the parts | {_fmt(total, 2)} | 100.0 % | {_fmt(_rate(result['batch'], total))} |")
    lines.append(f"| eager step, whole | {_fmt(eager['ms'], 2)} | | {_fmt(eager['img_per_s'])} |")
    graph_ms = graph["ms"] if graph else None
    graph_rate = graph["img_per_s"] if graph else None
    lines.append(f"| CUDA-graph step, whole | {_fmt(graph_ms, 2)} | | {_fmt(graph_rate)} |")
    lines.append(
        f"| data pipeline ({data['workers']} workers) | {_fmt(data['ms_per_batch'], 2)} per batch | "
        f"{_fmt(data['ratio'], 2)}x the step | {_fmt(data['img_per_s'])} |"
    )
    kernels = result["kernels"]
    lines += [
        "",
        f"| student {kernels['source']} (fwd + bwd + optimizer) | ms / step | % of the student |",
        "| --- | --: | --: |",
    ]
    for kind, entry in kernels["kinds"].items():
        lines.append(f"| {kind} | {_fmt(entry['ms'], 2)} | {_fmt(entry['percent'])} % |")
    lines.append(f"| total | {_fmt(kernels['total_ms'], 2)} | 100.0 % |")
    return "\n".join(lines)


def summary_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| student | px | graph img/s | eager img/s | teacher fwd | student fwd + loss | backward | clip + AdamW "
        "| scan % of student | data img/s | data / step |",
        "| --- | --: | --: | --: | --: | --: | --: | --: | --: | --: | --: |",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['student']} | {r['img_size']} | {r['error']} | | | | | | | | |")
            continue
        parts, total = r["parts"]["ms"], r["parts"]["sum_ms"]
        shares = " | ".join(f"{_fmt(100.0 * parts[p] / total)} %" for p in PARTS)
        graph = _fmt(r["graph_step"]["img_per_s"]) if r["graph_step"] else "n/a"
        scan = r["kernels"]["kinds"]["selective scan"]["percent"]
        lines.append(
            f"| {r['student']} | {r['img_size']} | {graph} | {_fmt(r['eager_step']['img_per_s'])} | {shares} "
            f"| {_fmt(scan)} % | {_fmt(r['data']['img_per_s'])} | {_fmt(r['data']['ratio'], 2)} |"
        )
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {"torch": torch.__version__, "triton": triton_version}


# -- main --------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--students", help="registry names, comma-separated (default vim-t,vim-s,vim-b)")
    parser.add_argument("--img-sizes", help="image sides in px, comma-separated (default 224,112)")
    parser.add_argument("--teacher", default="deit-s", help="registry name of the teacher's shape (default deit-s)")
    parser.add_argument("--batch-size", type=int, help="images per step (default 128)")
    parser.add_argument("--steps", type=int, help="timed steps per measurement; the median is reported (default 30)")
    parser.add_argument("--warmup", type=int, help="untimed steps first: compilation, autotuning (default 10)")
    parser.add_argument("--profile-steps", type=int, help="profiled student steps for the kernel kinds (default 3)")
    parser.add_argument("--data", help="the loader's --data spec: synthetic:N or fashion-mnist[:ROOT] (synthetic:8192)")
    parser.add_argument("--data-batches", type=int, help="timed loader batches (default 40)")
    parser.add_argument("--data-warmup", type=int, help="untimed loader batches first (default 4)")
    parser.add_argument("--workers", type=int, help="loader processes (default min(8, usable CPUs))")
    parser.add_argument("--num-classes", type=int, help="classes of teacher and student (default 1000)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    parser.add_argument("--teacher-set", action="append", metavar="FIELD=VALUE", help="teacher config override")
    parser.add_argument("--student-set", action="append", metavar="FIELD=VALUE", help="student config override")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--json", help="write every number to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny models at 32 px, 2 timed steps (CPU check)")
    args = parser.parse_args(argv)
    defaults = SMOKE_DEFAULTS if args.smoke else FULL_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        args.workers = min(8, cpus)
    if args.steps < 1 or args.profile_steps < 1 or args.data_batches < 1 or args.batch_size < 1:
        parser.error("--steps, --profile-steps, --data-batches and --batch-size must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    dist = init_distributed(args.device)
    if dist.distributed:
        raise SystemExit("distill_profile.py profiles one process; run it with python3, not torchrun")
    device = dist.device
    setup = Setup(args, dist)
    students = [s.strip() for s in args.students.split(",") if s.strip()]
    sizes = [int(s) for s in args.img_sizes.split(",") if s.strip()]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta = {
        "card": card,
        "device": str(device),
        **_versions(),
        "scan_backend_resolved": resolve_backend(device),
        "teacher": args.teacher,
        "teacher_overrides": setup.teacher_set,
        "student_overrides": setup.student_set,
        "batch": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "profile_steps": args.profile_steps,
        "recipe_overrides": list(args.set),
        "smoke": args.smoke,
    }
    print(
        f"# distillation step profile: {card}, torch {meta['torch']}, triton {meta['triton']}, teacher {args.teacher}, "
        f"batch {args.batch_size}, median of {args.steps} steps",
        flush=True,
    )
    results: list[dict[str, Any]] = []
    data_by_size: dict[int, dict[str, Any]] = {}
    for img_size in sizes:
        for student in students:
            try:
                result = profile_configuration(setup, student, img_size)
            except torch.cuda.OutOfMemoryError:
                result = {"student": student, "img_size": img_size, "batch": args.batch_size, "error": "out of memory"}
                print(f"\n{student} at {img_size} px, batch {args.batch_size}: out of GPU memory", flush=True)
            _free(device)  # outside the except: its traceback no longer holds the failed step's tensors
            results.append(result)
    for img_size in sizes:  # after every GPU measurement, so the loader's processes never compete with a step
        if any("error" not in r and r["img_size"] == img_size for r in results):
            data_by_size[img_size] = measure_data(setup, img_size, setup.recipe(cuda_graph=False))
    meta["amp_bf16"] = next((r["amp_bf16"] for r in results if "amp_bf16" in r), None)
    print(
        f"scan backend: {meta['scan_backend_resolved']} (the dispatcher's choice for the device; the kernel table "
        "shows the scan kernels that ran), "
        f"bf16 autocast: {meta['amp_bf16']}, data: {args.data} with {args.workers} workers\n",
        flush=True,
    )
    for result in results:
        if "error" in result:
            continue
        data = dict(data_by_size[result["img_size"]])
        data["ratio"] = data["img_per_s"] / step_rate(result)
        data["ratio_eager"] = data["img_per_s"] / result["eager_step"]["img_per_s"]
        result["data"] = data
        print(configuration_table(result) + "\n", flush=True)
    print("### summary (shares: of the eager step's parts; data / step: loader img/s over the step's img/s)\n")
    print(summary_table(results), flush=True)
    report = {"meta": meta, "results": results}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
        print(f"\nwrote {args.json}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
