"""One ViM training step on tmconvert's kernels against the same model on mamba-ssm's, in the same run on the same card.

    source benchmarks/device_env.sh && python3 benchmarks/train_step.py [--json step.json]
    python3 benchmarks/train_step.py --model vim-t --batch-size 64          # another configuration
    python3 benchmarks/train_step.py --smoke                                # CPU check of the script, seconds

The step a user pays for when training a ViM without a teacher: forward, cross-entropy, backward, gradient clipping
and a fused AdamW step, bf16 autocast, random images and labels already on the GPU (the number is the model's, not
the loader's). The model and its weights are identical for every backend; only the kernels differ:

  triton  tmconvert's Triton selective scan + PyTorch's depthwise conv (the library's default on a GPU without
          mamba-ssm);
  cuda    mamba-ssm's compiled `selective_scan_fn` + the causal-conv1d package's `causal_conv1d_fn` (what
          `TMCONVERT_SCAN_BACKEND=cuda` runs; build both on the GPU machine first).

Each backend is warmed up (Triton compilation and autotuning), then the backends take turns in `--rounds` rounds of
`--steps` steps, timed with CUDA events; the median step over all rounds is reported as ms and img/s, with peak
memory and the ratio to the `cuda` backend. Taking turns spreads clock and thermal drift over both. Backends that
cannot run here are reported as unavailable, not skipped silently. With `--compile`, the same again with the model
under `torch.compile` (the scan stays an opaque autograd function: graph breaks around it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tmconvert.kernels import BackendError, resolve_backend, use_backend
from tmconvert.kernels.conv1d import _load_causal_conv1d
from tmconvert.models import build_model

BACKENDS = ("triton", "cuda")


def make_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, amp: bool) -> Callable[[], None]:
    """A closure running one full training step; its optimizer state is built on the first call."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=images.is_cuda)

    def step() -> None:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_steps(step: Callable[[], None], n: int, device: torch.device) -> list[float]:
    """Milliseconds of each of `n` steps (CUDA events on the GPU, perf_counter on the CPU)."""
    times = []
    for _ in range(n):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            import time

            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def unavailable(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run the whole model here, or None."""
    try:
        resolve_backend(device, backend)
    except BackendError as exc:
        return str(exc)
    if backend == "cuda" and _load_causal_conv1d() is None:
        return "the causal-conv1d package is not installed (mamba-ssm's stack would run PyTorch's conv)"
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vim-s")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds in which the backends take turns")
    parser.add_argument("--compile", action="store_true", help="also time the models under torch.compile")
    parser.add_argument("--json", help="write every number to this file")
    parser.add_argument("--smoke", action="store_true", help="a tiny ViM on the CPU, 2 steps (checks the script)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    overrides = {"img_size": (args.img_size, args.img_size)}
    if args.smoke:
        overrides.update(embed_dim=32, depth=2, d_state=4, img_size=(32, 32), patch_size=8, num_classes=10)
        args.batch_size, args.warmup, args.steps, args.rounds = 2, 1, 2, 1
    amp = device.type == "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    model0 = build_model(args.model, seed=0, device=device, **overrides)
    images = torch.randn(args.batch_size, 3, *overrides["img_size"], device=device, generator=gen)
    labels = torch.randint(0, model0.head.out_features, (args.batch_size,), device=device, generator=gen)

    names = ("reference",) if device.type == "cpu" else BACKENDS
    variants = [(name, False) for name in names] + ([(name, True) for name in names] if args.compile else [])
    runs: dict[str, dict] = {}
    steps: dict[str, Callable[[], None]] = {}
    for name, compiled in variants:
        label = f"{name}{' + compile' if compiled else ''}"
        reason = unavailable(name, device) if device.type == "cuda" else None
        if reason is not None:
            runs[label] = {"backend": name, "compile": compiled, "unavailable": reason}
            continue
        model = build_model(args.model, seed=0, device=device, **overrides)
        model.load_state_dict(model0.state_dict())
        model.train()
        forward = torch.compile(model) if compiled else model
        step = make_step(forward, images, labels, amp)
        with use_backend(name):
            time_steps(step, args.warmup, device)
        steps[label] = step
        runs[label] = {"backend": name, "compile": compiled, "times_ms": []}
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.rounds):
        for label, step in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with use_backend(runs[label]["backend"]):
                runs[label]["times_ms"] += time_steps(step, args.steps, device)
            if device.type == "cuda":
                runs[label]["peak_gib"] = max(
                    runs[label].get("peak_gib", 0.0), torch.cuda.max_memory_allocated() / 2**30
                )

    for run in runs.values():
        if "times_ms" in run:
            run["median_ms"] = statistics.median(run["times_ms"])
            run["img_per_s"] = args.batch_size / run["median_ms"] * 1e3
    header = {
        "card": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": args.model,
        "img_size": args.img_size,
        "batch_size": args.batch_size,
        "amp": "bf16" if amp else "off",
        "timed_steps": args.steps * args.rounds,
    }
    print(" | ".join(f"{k}: {v}" for k, v in header.items()), file=sys.stderr)
    print("| kernels | ms / step | img/s | peak GiB | time vs mamba-ssm's (same compile setting) |")
    print("| --- | --- | --- | --- | --- |")
    for label, run in runs.items():
        if "unavailable" in run:
            print(f"| {label} | unavailable: {run['unavailable']} | | | |")
            continue
        baseline = runs.get("cuda + compile" if run["compile"] else "cuda", {}).get("median_ms")
        ratio = f"{run['median_ms'] / baseline:.2f}x" if baseline else "n/a"
        peak = f"{run['peak_gib']:.1f}" if "peak_gib" in run else "n/a"
        print(f"| {label} | {run['median_ms']:.1f} | {run['img_per_s']:.0f} | {peak} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**header, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
