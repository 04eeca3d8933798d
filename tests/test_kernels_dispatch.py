"""Backend selection for `selective_scan`: argument > env var > automatic, with clear errors.

Availability of triton and mamba-ssm is monkeypatched (fake kernels that delegate to the reference), so the
selection logic is tested the same way on every machine; CUDA devices are only named, never used.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tmconvert.converter.cli import USER_ERRORS
from tmconvert.kernels import BackendError, dispatch, selective_scan
from tmconvert.kernels.dispatch import available_backends, resolve_backend
from tmconvert.kernels.selective_scan_ref import selective_scan_ref

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


class FakeKernel:
    """Records calls and answers with the reference scan; `forward_only` mimics mamba-ssm (no `reverse`)."""

    def __init__(self, forward_only: bool = False) -> None:
        self.calls: list[dict] = []
        self.forward_only = forward_only

    def __call__(self, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *rest, **kwargs):
        if self.forward_only:
            assert not kwargs and len(rest) == 1, "mamba-ssm's selective_scan_fn takes 10 positional arguments"
            kwargs = {"return_last_state": rest[0]}
        self.calls.append({"u": u, "delta": delta, "B": B, "C": C, "z": z, **kwargs})
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, **kwargs)


@pytest.fixture
def backends(monkeypatch: pytest.MonkeyPatch):
    """Set which optional backends import: `backends(triton=..., cuda=...)` returns the fake kernels."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def install(triton: bool = False, cuda: bool = False) -> tuple[FakeKernel, FakeKernel]:
        fakes = FakeKernel(), FakeKernel(forward_only=True)
        monkeypatch.setattr(dispatch, "_load_triton", lambda: fakes[0] if triton else None)
        monkeypatch.setattr(dispatch, "_load_cuda", lambda: fakes[1] if cuda else None)
        return fakes

    return install


def scan_args(seqlen: int = 6, dstate: int = 3, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seqlen)
    batch, dim = 2, 4
    return {
        "u": torch.randn(batch, dim, seqlen, generator=gen).to(dtype),
        "delta": torch.randn(batch, dim, seqlen, generator=gen).to(dtype),
        "A": -torch.rand(dim, dstate, generator=gen),
        "B": torch.randn(batch, 2, dstate, seqlen, generator=gen).to(dtype),
        "C": torch.randn(batch, 2, dstate, seqlen, generator=gen).to(dtype),
        "D": torch.randn(dim, generator=gen),
        "z": torch.randn(batch, dim, seqlen, generator=gen).to(dtype),
        "delta_bias": torch.randn(dim, generator=gen),
    }


@pytest.mark.parametrize(
    ("triton", "cuda", "on_cpu", "on_cuda"),
    [
        (False, False, "reference", "reference"),
        (True, False, "reference", "triton"),
        (False, True, "reference", "cuda"),
        (True, True, "reference", "cuda"),
    ],
)
def test_automatic_selection(backends, triton: bool, cuda: bool, on_cpu: str, on_cuda: str) -> None:
    backends(triton=triton, cuda=cuda)
    assert resolve_backend(CPU) == on_cpu
    assert resolve_backend(CUDA) == on_cuda
    assert resolve_backend(CUDA, "auto") == on_cuda


def test_cpu_stays_on_reference_under_triton_interpreter(backends, monkeypatch: pytest.MonkeyPatch) -> None:
    """The interpreter makes triton *usable* on CPU (tests), never the automatic CPU choice (it is slow)."""
    backends(triton=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend(CPU) == "reference"
    assert resolve_backend(CPU, "triton") == "triton"


def test_explicit_argument_wins(backends, monkeypatch: pytest.MonkeyPatch) -> None:
    backends(triton=True, cuda=True)
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert resolve_backend(CUDA, "reference") == "reference"
    assert resolve_backend(CUDA, "CUDA") == "cuda"
    assert resolve_backend(CUDA) == "triton"  # env beats automatic (which would pick cuda)


@pytest.mark.parametrize("value", ["", "auto", "AUTO"])
def test_env_var_auto_means_automatic(backends, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    backends(triton=True, cuda=True)
    monkeypatch.setenv(dispatch.ENV_VAR, value)
    assert resolve_backend(CUDA) == "cuda"


def test_env_var_selects_backend_for_calls(backends, monkeypatch: pytest.MonkeyPatch) -> None:
    triton_fake, _ = backends(triton=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    args = scan_args()
    out, state = selective_scan(**args, delta_softplus=True, return_last_state=True, reverse=True)
    assert len(triton_fake.calls) == 1
    assert triton_fake.calls[0]["reverse"] is True and triton_fake.calls[0]["return_last_state"] is True
    expected = selective_scan_ref(**args, delta_softplus=True, return_last_state=True, reverse=True)
    torch.testing.assert_close((out, state), expected, rtol=0, atol=0)
    selective_scan(**args, backend="reference")  # the argument overrides the env var
    assert len(triton_fake.calls) == 1


def test_unavailable_backend_raises_backend_error(backends) -> None:
    backends(triton=False, cuda=False)
    with pytest.raises(BackendError) as err:
        resolve_backend(CUDA, "cuda")
    message = str(err.value)
    assert "'cuda'" in message and "cannot be imported" in message and "available on cuda: reference" in message
    assert "\n" not in message
    assert isinstance(err.value, USER_ERRORS)  # the CLI reports it as one line
    with pytest.raises(BackendError, match=r"'triton' .*cannot be imported.*available on cpu: reference"):
        selective_scan(**scan_args(), backend="triton")


def test_backend_present_but_wrong_device(backends) -> None:
    backends(triton=True, cuda=True)
    with pytest.raises(BackendError, match=r"'cuda' \(backend argument\).*needs CUDA tensors.*available on cpu: ref"):
        resolve_backend(CPU, "cuda")
    with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        resolve_backend(CPU, "triton")


def test_unknown_backend_names(backends, monkeypatch: pytest.MonkeyPatch) -> None:
    backends()
    with pytest.raises(BackendError, match=r"unknown selective-scan backend 'fast'.*reference, triton, cuda"):
        resolve_backend(CPU, "fast")
    monkeypatch.setenv(dispatch.ENV_VAR, "bogus")
    with pytest.raises(BackendError, match=f"'bogus' \\(env {dispatch.ENV_VAR}\\)"):
        resolve_backend(CPU)


def test_available_backends(backends, monkeypatch: pytest.MonkeyPatch) -> None:
    backends(triton=True, cuda=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert available_backends() == ["reference"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert available_backends() == ["reference", "triton"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert available_backends() == ["reference", "triton", "cuda"]
    backends(triton=False, cuda=False)
    assert available_backends() == ["reference"]


def test_cuda_support_rules() -> None:
    args = scan_args()
    assert dispatch._cuda_unsupported_reason(**args) is None
    assert "N=300" in dispatch._cuda_unsupported_reason(**scan_args(dstate=300))
    assert "fp32/fp16/bf16" in dispatch._cuda_unsupported_reason(**scan_args(dtype=torch.float64))
    assert "A must be fp32" in dispatch._cuda_unsupported_reason(**(args | {"A": args["A"].double()}))
    assert "u's dtype" in dispatch._cuda_unsupported_reason(**(args | {"B": args["B"].bfloat16()}))
    assert "fp32" in dispatch._cuda_unsupported_reason(**(args | {"D": args["D"].double()}))


@pytest.mark.parametrize(("triton", "fallback"), [(True, "triton"), (False, "reference")])
def test_automatic_steps_down_from_cuda_for_unsupported_calls(backends, triton: bool, fallback: str) -> None:
    backends(triton=triton, cuda=True)
    assert dispatch._backend_for_call(CUDA, torch.float32, None, lambda: None) == "cuda"
    assert dispatch._backend_for_call(CUDA, torch.float32, None, lambda: "state size N=300 exceeds 256") == fallback
    with pytest.raises(BackendError, match=r"'cuda' .*cannot run this call: state size N=300"):
        dispatch._backend_for_call(CUDA, torch.float32, "cuda", lambda: "state size N=300 exceeds 256")


@pytest.mark.parametrize("return_last_state", [False, True])
def test_cuda_reverse_flips_sequence_in_and_out(backends, return_last_state: bool) -> None:
    """mamba-ssm has no `reverse`: the dispatcher feeds it the time-flipped sequence and flips the output back."""
    _, cuda_fake = backends(cuda=True)
    args = scan_args(seqlen=9)
    got = dispatch._run_cuda(cuda_fake, *args.values(), True, return_last_state, True)
    expected = selective_scan_ref(**args, delta_softplus=True, return_last_state=return_last_state, reverse=True)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    call = cuda_fake.calls[0]
    for name in ("u", "delta", "B", "C", "z"):
        assert torch.equal(call[name], args[name].flip(-1)), name
    forward = dispatch._run_cuda(cuda_fake, *args.values(), True, return_last_state, False)
    assert torch.equal(cuda_fake.calls[1]["u"], args["u"])
    torch.testing.assert_close(
        forward, selective_scan_ref(**args, delta_softplus=True, return_last_state=return_last_state)
    )


def test_reference_backend_by_default_on_cpu(backends) -> None:
    triton_fake, cuda_fake = backends(triton=True, cuda=True)
    args = scan_args()
    out = selective_scan(**args, delta_softplus=True)
    assert not triton_fake.calls and not cuda_fake.calls
    torch.testing.assert_close(out, selective_scan_ref(**args, delta_softplus=True), rtol=0, atol=0)


def test_selective_scan_validates_before_dispatch(backends) -> None:
    backends()
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(**(scan_args() | {"A": torch.zeros(3, 3)}))


def test_package_import_is_light() -> None:
    """Importing tmconvert.kernels must not import triton or mamba-ssm (slow, optional, may be broken)."""
    code = "import sys, tmconvert.kernels; print(sorted({'triton', 'mamba_ssm'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_use_backend_scopes_calls_without_an_explicit_backend(monkeypatch) -> None:
    from tmconvert.kernels import use_backend

    monkeypatch.setenv("TMCONVERT_SCAN_BACKEND", "triton")
    cpu = torch.device("cpu")
    with use_backend("reference"):
        assert resolve_backend(cpu) == "reference"  # the block beats the environment
        with use_backend(None):
            monkeypatch.delenv("TMCONVERT_SCAN_BACKEND")
            assert resolve_backend(cpu) == "reference"  # automatic on CPU
    with use_backend("nonsense"), pytest.raises(BackendError, match="use_backend"):
        resolve_backend(cpu)
    assert available_backends(cpu)[0] == "reference"


def test_automatic_choice_sends_float64_calls_to_reference(monkeypatch) -> None:
    calls = []

    def fake_triton(*args, **kwargs):
        calls.append("triton")
        return selective_scan_ref(*args, **kwargs)

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("TMCONVERT_SCAN_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "_load_triton", lambda: fake_triton)
    monkeypatch.setattr(dispatch, "_automatic", lambda device: "triton")  # as on a GPU without mamba-ssm
    u = torch.randn(1, 2, 5, dtype=torch.float64)
    A = -torch.rand(2, 3, dtype=torch.float64)
    B, C = torch.randn(1, 3, 5, dtype=torch.float64), torch.randn(1, 3, 5, dtype=torch.float64)
    selective_scan(u, torch.rand_like(u), A, B, C)
    assert calls == []
    selective_scan(u.float(), torch.rand_like(u).float(), A.float(), B.float(), C.float())
    assert calls == ["triton"]
