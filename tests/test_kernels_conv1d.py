"""The depthwise causal conv1d: its definition in float64, the anti-causal mode, and the `causal-conv1d` package's
compiled kernel taking over under the `cuda` backend (on a GPU where the package is installed)."""

from __future__ import annotations

import pytest
import torch

from tmconvert.kernels import conv1d, dispatch, use_backend
from tmconvert.kernels.conv1d import causal_conv1d


def conv_definition(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, reverse: bool) -> torch.Tensor:
    """out[t] = sum_k w[k] x[t - (K-1) + k] (causal) or x[t + (K-1) - k] (anti-causal), zeros outside, + bias."""
    length, width = x.shape[-1], weight.shape[-1]
    out = bias[None, :, None].expand_as(x).clone()
    for t in range(length):
        for k in range(width):
            s = t + (width - 1) - k if reverse else t - (width - 1) + k
            if 0 <= s < length:
                out[..., t] += weight[:, k] * x[..., s]
    return out


def random_conv_inputs(device: str, dtype: torch.dtype, length: int = 9) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh inputs every run
    x = torch.randn(2, 8, length, generator=gen, dtype=torch.float64)
    weight = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    bias = torch.randn(8, generator=gen, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, weight, bias))


@pytest.mark.parametrize("reverse", [False, True])
def test_matches_definition_in_float64(reverse: bool) -> None:
    x, weight, bias = random_conv_inputs("cpu", torch.float64)
    expected = conv_definition(x, weight, bias, reverse)
    torch.testing.assert_close(causal_conv1d(x, weight, bias, reverse=reverse), expected, rtol=1e-12, atol=1e-12)
    silu = causal_conv1d(x, weight.unsqueeze(1), bias, activation="silu", reverse=reverse)
    torch.testing.assert_close(silu, torch.nn.functional.silu(expected), rtol=1e-12, atol=1e-12)


def test_cpu_never_takes_the_compiled_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    def compiled_must_not_run() -> None:
        raise AssertionError("the compiled conv is for CUDA tensors only")

    monkeypatch.setattr(conv1d, "_load_causal_conv1d", compiled_must_not_run)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    x, weight, bias = random_conv_inputs("cpu", torch.float32)
    with use_backend("reference"):
        out = causal_conv1d(x, weight, bias, activation="silu")
    assert out.shape == x.shape and torch.isfinite(out).all()


needs_compiled_conv = pytest.mark.skipif(
    not torch.cuda.is_available() or conv1d._load_causal_conv1d() is None or dispatch._load_cuda() is None,
    reason="needs a GPU with mamba-ssm and causal-conv1d built (the comparison baseline of benchmarks/train_step.py)",
)


@needs_compiled_conv
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backend_runs_the_compiled_conv_and_agrees(reverse: bool, dtype: torch.dtype) -> None:
    x64, w64, b64 = random_conv_inputs("cuda", torch.float64, length=197)
    expected = torch.nn.functional.silu(conv_definition(x64, w64, b64, reverse))
    calls: list[bool] = []
    compiled = conv1d._load_causal_conv1d()

    def counting(*args, **kwargs):
        calls.append(True)
        return compiled(*args, **kwargs)

    x = x64.to(dtype).requires_grad_(True)
    weight, bias = w64.float().requires_grad_(True), b64.float().requires_grad_(True)
    conv1d_loader = conv1d._load_causal_conv1d
    try:
        conv1d._load_causal_conv1d = lambda: counting
        with use_backend("cuda"):
            out = causal_conv1d(x, weight, bias, activation="silu", reverse=reverse)
    finally:
        conv1d._load_causal_conv1d = conv1d_loader
    assert calls, "the cuda backend did not run causal-conv1d's kernel"
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    rel = (out.double() - expected).norm() / expected.norm()
    assert rel < tol
    probe = torch.randn_like(x64)
    (out.double() * probe).sum().backward()
    leaves64 = [t.detach().clone().requires_grad_(True) for t in (x64, w64, b64)]
    (causal_conv1d(*leaves64, activation="silu", reverse=reverse) * probe).sum().backward()  # float64: PyTorch path
    for got, want in zip((x, weight, bias), leaves64, strict=True):
        assert (got.grad.double() - want.grad).norm() / want.grad.norm() < tol
