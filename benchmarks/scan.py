"""Selective-scan benchmark: our Triton kernels against mamba-ssm's CUDA kernel and the PyTorch reference.

    source benchmarks/device_env.sh && python3 benchmarks/scan.py [--sweep] [--json results.json]

Times (median of `triton.testing.do_bench`, which flushes the L2 before every timed call, so each call streams its
inputs from memory) the forward and forward+backward of every backend on the workloads of ViM-S/B training,
VideoMamba and VMamba (`SHAPES` below), next to the memory floor (bytes each pass must move, over the device-to-device
copy bandwidth measured in the same run), and checks our outputs against mamba-ssm's and the reference's on each
shape. mamba-ssm is optional: without it the CUDA columns say so. `--sweep` also times alternative launch
configurations of the Triton kernels (how the shipped defaults were chosen, see docs/kernels.md).
`--smoke` runs everything on tiny shapes on the CPU (Triton interpreter, wall-clock timer) to check the script.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import triton

import tmconvert.kernels.selective_scan_triton as sst
from tmconvert.kernels.selective_scan_ref import selective_scan_ref

ScanFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    dim: int
    seqlen: int
    dstate: int
    groups: int | None  # None: B/C (batch, N, L), as ViM calls it; G: (batch, G, N, L), as VMamba's 4 directions
    dtype: torch.dtype
    gated: bool = True  # z passed to the scan (ViM, VideoMamba); PlainMamba gates the sum of its scans outside

    def label(self) -> str:
        grouped = f", G={self.groups}" if self.groups else ""
        gate = "" if self.gated else ", z=None"
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.name}: {self.batch}x{self.dim}x{self.seqlen}, N={self.dstate}{grouped}{gate}, {dtype}"


SHAPES = [
    Shape("ViM-S", 128, 768, 197, 16, None, torch.bfloat16),
    Shape("ViM-S", 128, 768, 197, 16, None, torch.float32),
    Shape("ViM-B", 64, 1536, 197, 16, None, torch.bfloat16),
    Shape("VideoMamba-S 8f", 8, 768, 8 * 196 + 1, 16, None, torch.bfloat16),
    Shape("VideoMamba-S 16f", 4, 768, 16 * 196 + 1, 16, None, torch.bfloat16),
    # PlainMamba-L1 at 224 px, batch 64: its four zig-zag scans run as one call over 4 x 64 sequences
    Shape("PlainMamba-L1", 4 * 64, 384, 196, 16, None, torch.bfloat16, gated=False),
    # VMamba-T at 224 px, batch 32: each stage's four cross-scans as one grouped call (4 x d_inner channels), ungated
    # (v05_noz has no z); stage 1 ran gated in runs before 2026-12-05
    Shape("VMamba-T stage 1", 32, 4 * 96, 56 * 56, 1, 4, torch.bfloat16, gated=False),
    Shape("VMamba-T stage 2", 32, 4 * 192, 28 * 28, 1, 4, torch.bfloat16, gated=False),
    Shape("VMamba-T stage 3", 32, 4 * 384, 14 * 14, 1, 4, torch.bfloat16, gated=False),
    Shape("VMamba-T stage 4", 32, 4 * 768, 7 * 7, 1, 4, torch.bfloat16, gated=False),
]
SMOKE_SHAPES = [
    Shape("smoke", 2, 8, 37, 4, None, torch.float32),
    Shape("smoke", 2, 8, 29, 1, 2, torch.bfloat16),
    Shape("smoke", 2, 8, 23, 4, None, torch.float32, gated=False),
]


def make_inputs(shape: Shape, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs with the magnitudes of a trained Mamba: softplus(delta + bias) mostly 0.001-0.1, A = -(1..N)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    b, d, length, n = shape.batch, shape.dim, shape.seqlen, shape.dstate
    bc_shape = (b, n, length) if shape.groups is None else (b, shape.groups, n, length)

    def randn(*size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=device).to(dtype)

    inputs = {
        "u": randn(b, d, length, dtype=shape.dtype),
        "delta": randn(b, d, length, dtype=shape.dtype),
        "A": -torch.arange(1, n + 1, device=device, dtype=torch.float32).repeat(d, 1),
        "B": randn(*bc_shape, dtype=shape.dtype),
        "C": randn(*bc_shape, dtype=shape.dtype),
        "D": randn(d),
        "z": randn(b, d, length, dtype=shape.dtype),
        "delta_bias": randn(d) * 0.5 - 4.0,
    }
    if not shape.gated:
        del inputs["z"]
    return inputs


def floor_bytes(shape: Shape, backward: bool) -> int:
    """Bytes a pass must move at least. Forward reads u, delta, z, B, C and writes out; the backward reads those
    inputs and dout again and writes du, ddelta, dz, dB, dC (small parameters ignored; no z, no dz when ungated)."""
    element = torch.finfo(shape.dtype).bits // 8
    activation = shape.batch * shape.dim * shape.seqlen * element
    bc = shape.batch * (shape.groups or 1) * shape.dstate * shape.seqlen * element
    gate = 1 if shape.gated else 0
    forward = (3 + gate) * activation + 2 * bc
    return forward + ((5 + 2 * gate) * activation + 4 * bc if backward else 0)


def load_mamba_ssm() -> tuple[ScanFn | None, str]:
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except (ImportError, OSError) as exc:  # OSError: the extension is there but its libraries are not
        return None, f"mamba-ssm not importable ({type(exc).__name__}: {exc})"
    import mamba_ssm

    return selective_scan_fn, f"mamba-ssm {mamba_ssm.__version__}"


def timer(smoke: bool) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of fn."""
    if not smoke:
        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")

    def wall(fn: Callable[[], object]) -> float:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return wall


def copy_bandwidth(device: str, bench: Callable[[Callable[[], object]], float]) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written), the memory floor's denominator."""
    numel = (1 << 29) if device == "cuda" else (1 << 20)  # 2 GiB of fp32 on the GPU
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3)


def forward_fn(scan: ScanFn, x: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    return lambda: scan(**x, delta_softplus=True)


def forward_backward_fn(scan: ScanFn, x: dict[str, torch.Tensor], grad: torch.Tensor) -> Callable[[], object]:
    leaves = {k: v.detach().requires_grad_() for k, v in x.items()}
    names = list(leaves)

    def run() -> object:
        out = scan(**leaves, delta_softplus=True)
        return torch.autograd.grad(out, [leaves[k] for k in names], grad)

    return run


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.float()
    return ((actual.float() - expected).norm() / expected.norm()).item()


def run_shape(
    shape: Shape,
    device: str,
    bench: Callable[[Callable[[], object]], float],
    bandwidth: float,
    cuda_scan: ScanFn | None,
) -> dict[str, object]:
    x = make_inputs(shape, device)
    grad = torch.randn(shape.batch, shape.dim, shape.seqlen, device=device).to(shape.dtype)
    row: dict[str, object] = {"shape": shape.label()}
    row["floor_fwd_ms"] = floor_bytes(shape, backward=False) / bandwidth * 1e3
    row["floor_fwd_bwd_ms"] = floor_bytes(shape, backward=True) / bandwidth * 1e3
    row["triton_fwd_ms"] = bench(forward_fn(sst.selective_scan_triton, x))
    row["triton_fwd_bwd_ms"] = bench(forward_backward_fn(sst.selective_scan_triton, x, grad))
    ours = sst.selective_scan_triton(**x, delta_softplus=True)
    row["ref_fwd_ms"] = bench(forward_fn(selective_scan_ref, x))
    row["err_vs_ref"] = rel(ours, selective_scan_ref(**x, delta_softplus=True))
    if cuda_scan is not None:
        row["cuda_fwd_ms"] = bench(forward_fn(cuda_scan, x))
        row["cuda_fwd_bwd_ms"] = bench(forward_backward_fn(cuda_scan, x, grad))
        row["err_vs_cuda"] = rel(ours, cuda_scan(**x, delta_softplus=True))
        grads_ours = forward_backward_fn(sst.selective_scan_triton, x, grad)()
        grads_cuda = forward_backward_fn(cuda_scan, x, grad)()
        row["grad_err_vs_cuda"] = max(rel(a, b) for a, b in zip(grads_ours, grads_cuda, strict=True))
    return row


def markdown(rows: list[dict[str, object]]) -> str:
    def ms(row: dict[str, object], key: str) -> str:
        return f"{row[key]:.3f}" if key in row else "–"

    def ratio(row: dict[str, object], num: str, den: str) -> str:
        return f"{row[num] / row[den]:.2f}x" if num in row and den in row else "–"

    def err(row: dict[str, object], key: str) -> str:
        return f"{row[key]:.1e}" if key in row else "–"

    lines = [
        "| shape | Triton fwd | CUDA fwd | Triton/CUDA fwd | fwd floor | Triton fwd+bwd | CUDA fwd+bwd "
        "| Triton/CUDA fwd+bwd | fwd+bwd floor | reference fwd | out err vs CUDA / ref | grad err vs CUDA |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {ms(r, 'triton_fwd_ms')} | {ms(r, 'cuda_fwd_ms')} "
            f"| {ratio(r, 'triton_fwd_ms', 'cuda_fwd_ms')} | {ms(r, 'floor_fwd_ms')} | {ms(r, 'triton_fwd_bwd_ms')} "
            f"| {ms(r, 'cuda_fwd_bwd_ms')} | {ratio(r, 'triton_fwd_bwd_ms', 'cuda_fwd_bwd_ms')} "
            f"| {ms(r, 'floor_fwd_bwd_ms')} | {ms(r, 'ref_fwd_ms')} "
            f"| {err(r, 'err_vs_cuda')} / {err(r, 'err_vs_ref')} | {err(r, 'grad_err_vs_cuda')} |"
        )
    return "\n".join(lines)


def sweep_configs(shape: Shape, device: str) -> list[sst.LaunchConfig]:
    """Alternatives around the shipped default: channels per program, tiles and sequence segments, forward and
    backward (each distinct block shape costs a compile, so the list stays short)."""
    base = sst.launch_config(
        shape.batch, shape.dim, shape.groups or 1, shape.dstate, shape.seqlen, torch.device(device)
    )
    channels = shape.dim // (shape.groups or 1)

    def fwd(block_d: int, tile: int = base.fwd_tile_l, segments: int = base.fwd_segments) -> sst.LaunchConfig:
        block_d = sst._channel_block(channels, block_d)
        return dataclasses.replace(base, fwd_block_d=block_d, fwd_tile_l=tile, fwd_segments=segments)

    def bwd(block_d: int, tile: int, block_l: int = 1, segments: int | None = None) -> sst.LaunchConfig:
        n_chunks = triton.cdiv(shape.seqlen, base.chunk_len)
        segments = segments or sst._segments(
            shape.batch * shape.dim // block_d, n_chunks, torch.device(device), per_multiprocessor=2
        )
        block_d = sst._channel_block(channels, block_d)
        return dataclasses.replace(
            base, bwd_block_d=block_d, bwd_tile_l=tile, bwd_block_l=block_l, bwd_segments=segments
        )

    configs = [base, fwd(8), fwd(16), fwd(32), fwd(16, tile=16)]
    configs += [fwd(width, segments=s) for width in (16, 32) for s in (1, 2, 4, 8, 16)]
    configs += [bwd(8, 4, 4, segments=s) for s in (1, 2, 4, 8, 16)]
    configs += [bwd(4, 4, 4), bwd(16, 4, 4), bwd(8, 8, 8), bwd(16, 2), bwd(32, 1)]
    seen: list[sst.LaunchConfig] = []
    for config in configs:
        try:
            sst._check_config(config, channels)
        except ValueError:
            continue
        if config not in seen:
            seen.append(config)
    return seen


def run_sweep(shape: Shape, device: str, bench: Callable[[Callable[[], object]], float]) -> list[dict[str, object]]:
    x = make_inputs(shape, device, seed=1)
    grad = torch.randn(shape.batch, shape.dim, shape.seqlen, device=device).to(shape.dtype)
    default = sst.launch_config
    expected = sst.selective_scan_triton(**x, delta_softplus=True)
    expected_grads = forward_backward_fn(sst.selective_scan_triton, x, grad)()
    rows = []
    try:
        for config in sweep_configs(shape, device):
            sst.launch_config = lambda *args, config=config: config
            out = sst.selective_scan_triton(**x, delta_softplus=True)
            grads = forward_backward_fn(sst.selective_scan_triton, x, grad)()
            rows.append(
                {
                    "shape": shape.label(),
                    "config": dataclasses.asdict(config),
                    "fwd_ms": bench(forward_fn(sst.selective_scan_triton, x)),
                    "fwd_bwd_ms": bench(forward_backward_fn(sst.selective_scan_triton, x, grad)),
                    "err_vs_default": rel(out, expected),
                    "grad_err_vs_default": max(rel(a, b) for a, b in zip(grads, expected_grads, strict=True)),
                }
            )
            print(f"  {rows[-1]}", flush=True)
    finally:
        sst.launch_config = default
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also time alternative launch configurations")
    parser.add_argument("--only-sweep", action="store_true", help="time alternative launch configurations only")
    parser.add_argument("--shapes", default="", help="comma-separated indices into the shape list (default all)")
    parser.add_argument("--sweep-shapes", default="0,3,6", help="indices of the shapes to sweep (default 0,3,6)")
    parser.add_argument("--json", help="write all numbers to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter (checks the script)")
    args = parser.parse_args()

    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/scan.py needs a CUDA GPU (or --smoke for a CPU check of the script)")
    all_shapes = SMOKE_SHAPES if args.smoke else SHAPES
    shapes = [all_shapes[int(i)] for i in args.shapes.split(",")] if args.shapes else all_shapes
    bench = timer(args.smoke)
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    cuda_scan, cuda_note = load_mamba_ssm() if device == "cuda" else (None, "mamba-ssm needs CUDA")
    bandwidth = copy_bandwidth(device, bench)
    header = (
        f"card: {card}; torch {torch.__version__}; triton {triton.__version__}; {cuda_note}; "
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)"
    )
    print(header, flush=True)
    results: dict[str, object] = {"header": header, "command": " ".join(sys.argv)}

    if args.sweep or args.only_sweep:
        sweep_shapes = all_shapes if args.smoke else [all_shapes[int(i)] for i in args.sweep_shapes.split(",")]
        results["sweep"] = [row for s in sweep_shapes for row in run_sweep(s, device, bench)]
    if not args.only_sweep:
        rows = []
        for shape in shapes:
            rows.append(run_shape(shape, device, bench, bandwidth, cuda_scan))
            print(f"  {rows[-1]}", flush=True)
        results["rows"] = rows
        print(header)
        print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    if any(not math.isfinite(v) for r in results.get("rows", []) for v in r.values() if isinstance(v, float)):
        sys.exit("non-finite result")


if __name__ == "__main__":
    main()
