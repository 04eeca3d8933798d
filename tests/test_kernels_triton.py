"""The Triton selective scan against the float64 per-timestep definition (`selective_scan_naive`).

On a machine without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set below before triton is
imported) on small shapes with interpreter-friendly blocks; with CUDA they run compiled on realistic shapes and the
production launch configuration. Every check draws fresh random inputs: relative error (Frobenius norm) at most 1e-5
for fp32 and 1e-2 for half-precision inputs, for the output, last_state and every gradient.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first @triton.jit definition

import dataclasses
import math
from dataclasses import dataclass

import pytest

pytest.importorskip("triton")

import tmconvert.kernels.selective_scan_triton as sst
from tmconvert.kernels import selective_scan
from tmconvert.kernels.selective_scan_ref import selective_scan_naive

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETER or not torch.cuda.is_available() else "cuda"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@dataclass(frozen=True)
class Case:
    """One call: shapes, dtypes and which optional features are on."""

    batch: int = 2
    dim: int = 4
    seqlen: int = 37
    dstate: int = 5
    groups: int | None = None  # None: B/C (batch, N, L); else (batch, G, N, L)
    dtype: torch.dtype = torch.float32
    bc_dtype: torch.dtype | None = None  # None: same as dtype
    has_D: bool = True
    has_z: bool = True
    has_bias: bool = True
    softplus: bool = True
    reverse: bool = False


def _interpreter_config(batch, dim, groups, dstate, seqlen, device) -> sst.LaunchConfig:  # type: ignore[no-untyped-def]
    """Few, large programs (the interpreter pays per operation, not per element), chunks of 16 steps and the
    sequence split over up to 3 (forward) and 2 (backward) segments, so short test sequences still cross segment,
    chunk, tile and sub-tile boundaries."""
    block_d = sst._channel_block(dim // groups, 64)
    return sst.LaunchConfig(16, 8, 4, block_d, 1, 3, 8, 4, block_d, 1, 2)


PRODUCTION_CONFIG = sst.launch_config


@pytest.fixture(autouse=True)
def _small_blocks_in_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    if INTERPRETER:
        monkeypatch.setattr(sst, "launch_config", _interpreter_config)


def _inputs(case: Case, generator: torch.Generator) -> dict[str, torch.Tensor | None]:
    """Realistic magnitudes: step sizes softplus(delta + bias) around 0.01-1 (or a raw 0.05 +- 0.02), A = -(1..N)
    scaled (S4D-real init), unit-scale activations, B and C."""

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    b, d, length, n = case.batch, case.dim, case.seqlen, case.dstate
    bc_shape = (b, n, length) if case.groups is None else (b, case.groups, n, length)
    bc_dtype = case.bc_dtype or case.dtype
    if case.softplus:
        delta, bias = randn(b, d, length), randn(d) * 0.5 - 2.0
    else:
        delta, bias = (0.05 + 0.02 * randn(b, d, length)).abs(), 0.01 * randn(d).abs()
    return {
        "u": randn(b, d, length).to(case.dtype),
        "delta": delta.to(case.dtype),
        "A": -torch.exp(0.5 * randn(d, n)) * torch.arange(1, n + 1).float(),
        "B": randn(*bc_shape).to(bc_dtype),
        "C": randn(*bc_shape).to(bc_dtype),
        "D": randn(d) if case.has_D else None,
        "z": randn(b, d, length).to(case.dtype) if case.has_z else None,
        "delta_bias": bias if case.has_bias else None,
    }


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def _check_against_naive(case: Case, seed: int, *, grad_last_state: bool = True) -> None:
    """Forward (out, last_state) and every gradient of the Triton scan against float64 `selective_scan_naive`."""
    generator = torch.Generator().manual_seed(seed)
    inputs = _inputs(case, generator)
    names = [k for k, v in inputs.items() if v is not None]
    ours = {k: v.to(DEVICE, copy=True).requires_grad_() for k, v in inputs.items() if v is not None}
    exact = {k: v.to(torch.float64, copy=True).requires_grad_() for k, v in inputs.items() if v is not None}
    kwargs = {"delta_softplus": case.softplus, "return_last_state": True, "reverse": case.reverse}
    out, last = sst.selective_scan_triton(**ours, **kwargs)
    ref_out, ref_last = selective_scan_naive(**exact, **kwargs)

    def tolerance(dtype: torch.dtype) -> float:  # a half-precision result carries its rounding
        return max(TOLERANCE[case.dtype], TOLERANCE[dtype])

    assert out.dtype == case.dtype and last.dtype == torch.float32
    assert out.shape == ref_out.shape and last.shape == ref_last.shape
    errors = {"out": _rel(out.cpu(), ref_out), "last_state": _rel(last.cpu(), ref_last)}

    grad_out = torch.randn(ref_out.shape, generator=generator, dtype=torch.float64)
    grad_last = torch.randn(ref_last.shape, generator=generator, dtype=torch.float64) if grad_last_state else None
    loss = (out.double() * grad_out.to(DEVICE)).sum()
    ref_loss = (ref_out * grad_out).sum()
    if grad_last is not None:
        loss = loss + (last.double() * grad_last.to(DEVICE)).sum()
        ref_loss = ref_loss + (ref_last * grad_last).sum()
    loss.backward()
    ref_loss.backward()
    for name in names:
        assert ours[name].grad is not None, f"no gradient for {name}"
        assert ours[name].grad.dtype == inputs[name].dtype and ours[name].grad.shape == inputs[name].shape
        errors[f"d{name}"] = _rel(ours[name].grad.cpu(), exact[name].grad)
    dtypes = {"out": out.dtype, "last_state": last.dtype} | {f"d{k}": ours[k].grad.dtype for k in names}
    bad = {k: f"{v:.2e} > {tolerance(dtypes[k]):g}" for k, v in errors.items() if not v <= tolerance(dtypes[k])}
    assert not bad, f"{case}: relative error too large: {bad}"


CPU_CASES = {
    "all-features": Case(),
    "all-features-reverse": Case(reverse=True),
    "grouped": Case(dim=8, groups=2, dstate=4),
    "grouped-reverse-bare": Case(
        dim=6, groups=2, dstate=3, seqlen=21, has_D=False, has_z=False, has_bias=False, softplus=False, reverse=True
    ),
    "n1-z-only": Case(dstate=1, seqlen=50, has_D=False, has_bias=False),
    "n16-grouped-reverse": Case(dim=8, groups=4, dstate=16, seqlen=24, has_z=False, reverse=True),
    "chunk-multiple": Case(seqlen=32, dstate=2, reverse=True),
    "single-step": Case(seqlen=1, dstate=3),
    "single-step-reverse": Case(seqlen=1, dstate=3, reverse=True),
    "bf16": Case(dstate=8, dtype=torch.bfloat16),
    "bf16-grouped-reverse": Case(dim=8, groups=2, reverse=True, dtype=torch.bfloat16),
    "fp16": Case(seqlen=21, dstate=4, has_bias=False, dtype=torch.float16),
    "fp32-u-bf16-BC": Case(bc_dtype=torch.bfloat16, dstate=6, seqlen=19),
}

# Realistic shapes for a GPU (each distinct feature set costs a kernel compile, so the list stays short): ViM-S
# layers, VideoMamba (1 + 8 * 196 tokens, split into segments), VMamba stage 1 (G=4 directions, N=1), N=64.
CUDA_CASES = {
    "vim-s-bf16": Case(batch=2, dim=768, seqlen=197, dstate=16, dtype=torch.bfloat16),
    "vim-s-fp32-reverse": Case(batch=2, dim=768, seqlen=197, dstate=16, reverse=True),
    "vim-s-bf16-reverse-bare": Case(
        batch=3,
        dim=768,
        seqlen=197,
        dstate=16,
        has_D=False,
        has_z=False,
        has_bias=False,
        softplus=False,
        reverse=True,
        dtype=torch.bfloat16,
    ),
    "videomamba-fp32": Case(batch=1, dim=192, seqlen=8 * 196 + 1, dstate=16),
    "vmamba-grouped-n1": Case(batch=2, dim=384, groups=4, seqlen=3136, dstate=1, has_z=False),
    "n64-odd-dim-fp16": Case(batch=2, dim=40, seqlen=77, dstate=64, dtype=torch.float16),
}

CASES = CUDA_CASES if DEVICE == "cuda" else CPU_CASES


@pytest.mark.parametrize("name", list(CASES))
def test_matches_definition(name: str) -> None:
    _check_against_naive(CASES[name], seed=sum(map(ord, name)))


def test_production_config_and_no_last_state_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped launch configuration (sub-tiled forward, one-step backward), without a last_state gradient."""
    monkeypatch.setattr(sst, "launch_config", PRODUCTION_CONFIG)
    dim = 32 if DEVICE == "cpu" else 256
    _check_against_naive(Case(dim=dim, seqlen=23, dstate=4), 7, grad_last_state=False)
    _check_against_naive(Case(dim=dim, seqlen=23, dstate=4, reverse=True), 8)


@pytest.mark.parametrize("segments", [1, 4])
def test_every_output_element_is_written(monkeypatch: pytest.MonkeyPatch, segments: int) -> None:
    """Kernel-filled buffers start as NaN: a single unwritten element would surface in the result or gradient."""

    def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.full(shape, math.nan, dtype=dtype, device=device)

    def config(*args) -> sst.LaunchConfig:  # type: ignore[no-untyped-def]
        chosen = (_interpreter_config if INTERPRETER else PRODUCTION_CONFIG)(*args)
        return dataclasses.replace(chosen, fwd_segments=segments, bwd_segments=segments)

    monkeypatch.setattr(sst, "_new_output", poisoned)
    monkeypatch.setattr(sst, "launch_config", config)
    for reverse in (False, True):
        case = Case(dim=8, groups=2, seqlen=45, dstate=3, reverse=reverse)
        if DEVICE == "cuda":
            case = Case(batch=2, dim=256, groups=2, seqlen=45 * 29, dstate=3, reverse=reverse)
        _check_against_naive(case, 11 + reverse)


# Sequence lengths at and around every boundary the kernels cut at: a single step, the tiles (4, 8), the chunks
# (up to 64 steps) and, on a GPU, segment splits of long sequences.
BOUNDARY_LENGTHS = (1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129)
CPU_BOUNDARY_LENGTHS = (1, 2, 3, 8, 9, 17, 33)


@pytest.mark.parametrize("seqlen", CPU_BOUNDARY_LENGTHS if DEVICE == "cpu" else BOUNDARY_LENGTHS)
def test_boundary_lengths_with_poisoned_buffers(monkeypatch: pytest.MonkeyPatch, seqlen: int) -> None:
    """Every length near a tile, chunk or segment boundary, both directions, N = 1 and 16, with every buffer the
    kernels fill (outputs and scratch) starting as NaN: a read before a write shows up in a result or a gradient.
    At one step dA is exactly zero (the state entering it is zero), so any garbage there is caught absolutely."""

    def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.full(shape, math.nan, dtype=dtype, device=device)

    if not INTERPRETER:
        monkeypatch.setattr(sst, "launch_config", PRODUCTION_CONFIG)
    monkeypatch.setattr(sst, "_new_output", poisoned)
    dim = 8 if DEVICE == "cpu" else 64
    for reverse in (False, True):
        for dstate, dtype in ((1, torch.float32), (16, torch.float32), (16, torch.bfloat16)):
            if DEVICE == "cpu" and dtype == torch.bfloat16:
                continue
            case = Case(batch=2, dim=dim, seqlen=seqlen, dstate=dstate, dtype=dtype, reverse=reverse)
            _check_against_naive(case, seed=seqlen * 10 + dstate + reverse)


def test_views_without_copies_and_strided_inputs() -> None:
    """xz.chunk halves (batch stride 2*dim*L), B/C as transposed (b, L, N) views and a non-unit L stride."""
    generator = torch.Generator().manual_seed(3)
    b, d, length, n = 2, 8, 30, 4
    xz = torch.randn(b, 2 * d, length, generator=generator)
    x, z = xz.chunk(2, dim=1)
    delta = torch.randn(b, d, 2 * length, generator=generator)[..., ::2]  # stride 2 along L: must be copied
    A = -torch.rand(d, n, generator=generator) - 0.5
    B = torch.randn(b, length, n, generator=generator).transpose(1, 2)
    C = torch.randn(b, length, n, generator=generator).transpose(1, 2)
    D = torch.randn(d, generator=generator)
    args = [t.to(DEVICE) for t in (x, delta, A, B, C, D, z)]
    ours = sst.selective_scan_triton(*args, delta_softplus=True)
    expected = selective_scan_naive(*(t.double() for t in (x, delta, A, B, C, D, z)), delta_softplus=True)
    assert _rel(ours.cpu(), expected) <= 1e-5


def test_inference_path_matches_training_path() -> None:
    """Without autograd the forward skips the chunk states; results and last_state are identical."""
    inputs = {k: v.to(DEVICE) for k, v in _inputs(Case(), torch.Generator().manual_seed(5)).items() if v is not None}
    with torch.no_grad():
        out, last = sst.selective_scan_triton(**inputs, delta_softplus=True, return_last_state=True)
        out_only = sst.selective_scan_triton(**inputs, delta_softplus=True)
    grad_inputs = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    out_train, last_train = sst.selective_scan_triton(**grad_inputs, delta_softplus=True, return_last_state=True)
    assert torch.equal(out, out_train.detach()) and torch.equal(out, out_only)
    assert torch.equal(last, last_train.detach())


def test_dispatcher_triton_backend_matches_reference() -> None:
    inputs = {k: v.to(DEVICE) for k, v in _inputs(Case(reverse=True), torch.Generator().manual_seed(9)).items()}
    kwargs = {"delta_softplus": True, "reverse": True}
    ours = selective_scan(**inputs, **kwargs, backend="triton")
    reference = selective_scan(**inputs, **kwargs, backend="reference")
    assert _rel(ours.cpu(), reference.cpu()) <= 1e-5


def test_rejects_fp64() -> None:
    inputs = {k: v.to(DEVICE) for k, v in _inputs(Case(), torch.Generator().manual_seed(1)).items()}
    inputs["u"], inputs["delta"] = inputs["u"].double(), inputs["delta"].double()
    with pytest.raises(ValueError, match="fp32/bf16/fp16"):
        sst.selective_scan_triton(**inputs)


def test_vim_model_loss_and_gradients_match_reference_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2-layer ViM model, loss and every parameter gradient, triton vs the reference backend: ViM-S-shaped on a GPU
    (D 384, E 768, L 197, N 16, batch 4), a tiny one in the CPU interpreter (D 16, L 17, batch 2)."""
    from tmconvert.models import vim

    if DEVICE == "cuda":
        cfg, batch = vim.VimConfig(embed_dim=384, depth=2, num_classes=10), 4
    else:
        cfg, batch = vim.VimConfig(embed_dim=16, depth=2, d_state=4, patch_size=4, img_size=(16, 16), num_classes=10), 2
    model = vim.VisionMamba(cfg, seed=0, device=DEVICE)
    images = torch.randn(batch, 3, *cfg.img_size, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    labels = torch.arange(batch, device=DEVICE) % 10
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("TMCONVERT_SCAN_BACKEND", backend)
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        results[backend] = (loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()})
    (loss_ref, grads_ref), (loss_tri, grads_tri) = results["reference"], results["triton"]
    assert _rel(loss_tri, loss_ref) <= 1e-5
    errors = {n: _rel(grads_tri[n], g) for n, g in grads_ref.items() if g.norm() > 0}
    bad = {n: f"{e:.1e}" for n, e in errors.items() if e > 1e-4}
    assert not bad, f"gradients differ: {bad}"
