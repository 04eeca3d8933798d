"""The pure-PyTorch selective scan and causal conv1d against their definitions.

`selective_scan_naive` (one step per timestep) is the oracle; `selective_scan_ref` must equal it to fp64 rounding
for every feature combination, in values and gradients, and stay fp32-accurate for low-precision inputs.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from tmconvert.kernels import causal_conv1d
from tmconvert.kernels.selective_scan_ref import selective_scan_naive, selective_scan_ref

DIM, DSTATE, BATCH = 4, 3, 2


def scan_inputs(
    seqlen: int,
    groups: int | None,
    *,
    dtype: torch.dtype = torch.float64,
    dim: int = DIM,
    dstate: int = DSTATE,
    batch: int = BATCH,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Fresh random inputs with realistic ranges: delta > 0 before softplus, A < 0 (groups=None: ungrouped B/C)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    bc_shape = (batch, dstate, seqlen) if groups is None else (batch, groups, dstate, seqlen)
    inputs = {
        "u": rand(batch, dim, seqlen),
        "delta": torch.rand(batch, dim, seqlen, generator=gen, dtype=torch.float64) * 1.5 + 0.01,
        "A": -torch.rand(dim, dstate, generator=gen, dtype=torch.float64) * dstate - 0.1,
        "B": rand(*bc_shape),
        "C": rand(*bc_shape),
        "D": rand(dim),
        "z": rand(batch, dim, seqlen),
        "delta_bias": torch.rand(dim, generator=gen, dtype=torch.float64) * 0.5,
    }
    params = ("A", "D", "delta_bias")  # fp32 in the mamba-ssm contract whatever the input dtype
    return {k: v.to(torch.float32 if k in params and dtype != torch.float64 else dtype) for k, v in inputs.items()}


def assert_relative(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """max |actual - expected| <= tol * max |expected| (a norm-wise relative error, robust to entries near 0)."""
    assert actual.shape == expected.shape
    error = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), 1e-30)
    assert error <= tol * scale, f"relative error {error / scale:.3e} > {tol:.1e}"


FEATURES = list(itertools.product([False, True], repeat=4))  # use D, use z, use delta_bias, delta_softplus


@pytest.mark.parametrize("seqlen", [1, 7, 197])
@pytest.mark.parametrize("groups", [None, 1, 2])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(("use_D", "use_z", "use_bias", "softplus"), FEATURES)
def test_ref_equals_naive_fp64(
    seqlen: int, groups: int | None, reverse: bool, use_D: bool, use_z: bool, use_bias: bool, softplus: bool
) -> None:
    x = scan_inputs(seqlen, groups, seed=seqlen * 131 + (groups or 0) * 7 + reverse)
    kwargs = {
        "D": x["D"] if use_D else None,
        "z": x["z"] if use_z else None,
        "delta_bias": x["delta_bias"] if use_bias else None,
        "delta_softplus": softplus,
        "reverse": reverse,
    }
    core = (x["u"], x["delta"], x["A"], x["B"], x["C"])
    out_ref, state_ref = selective_scan_ref(*core, **kwargs, return_last_state=True)
    out_naive, state_naive = selective_scan_naive(*core, **kwargs, return_last_state=True)
    assert out_ref.dtype == torch.float64 and tuple(state_ref.shape) == (BATCH, DIM, DSTATE)
    assert_relative(out_ref, out_naive, 1e-10)
    assert_relative(state_ref, state_naive, 1e-10)
    assert torch.equal(selective_scan_ref(*core, **kwargs), out_ref)  # return_last_state only adds an output


def test_hand_computed_example() -> None:
    """L=3, D=1, N=1, A = -ln 2 so decays are 1/2 (delta=1) and 1/4 (delta=2); numbers worked out by hand.

    Forward:  h = 1*1*1 = 1          -> y = 2*1 + 0.5*1 = 2.5
              h = 0.5*1 + 1*2*2 = 4.5 -> y = 1*4.5 + 0.5*2 = 5.5
              h = 0.25*4.5 + 2*3*1 = 7.125 -> y = 3*7.125 + 0.5*3 = 22.875
    Reverse:  h = 2*3*1 = 6          -> y2 = 3*6 + 1.5 = 19.5
              h = 0.5*6 + 1*2*2 = 7  -> y1 = 1*7 + 1 = 8     (decay of the step being entered, t=1)
              h = 0.5*7 + 1*1*1 = 4.5 -> y0 = 2*4.5 + 0.5 = 9.5
    Gate z = ln 3: silu(ln 3) = ln 3 * sigmoid(ln 3) = 0.75 ln 3.
    """
    u = torch.tensor([[[1.0, 2.0, 3.0]]], dtype=torch.float64)
    delta = torch.tensor([[[1.0, 1.0, 2.0]]], dtype=torch.float64)
    A = torch.tensor([[-math.log(2.0)]], dtype=torch.float64)
    B = torch.tensor([[[1.0, 2.0, 1.0]]], dtype=torch.float64)
    C = torch.tensor([[[2.0, 1.0, 3.0]]], dtype=torch.float64)
    D = torch.tensor([0.5], dtype=torch.float64)
    for scan in (selective_scan_ref, selective_scan_naive):
        out, state = scan(u, delta, A, B, C, D, return_last_state=True)
        torch.testing.assert_close(out, torch.tensor([[[2.5, 5.5, 22.875]]], dtype=torch.float64))
        torch.testing.assert_close(state, torch.tensor([[[7.125]]], dtype=torch.float64))
        out, state = scan(u, delta, A, B, C, D, return_last_state=True, reverse=True)
        torch.testing.assert_close(out, torch.tensor([[[9.5, 8.0, 19.5]]], dtype=torch.float64))
        torch.testing.assert_close(state, torch.tensor([[[4.5]]], dtype=torch.float64))
        z = torch.full_like(u, math.log(3.0))
        gated = scan(u, delta, A, B, C, D, z=z)
        torch.testing.assert_close(
            gated, torch.tensor([[[2.5, 5.5, 22.875]]], dtype=torch.float64) * 0.75 * math.log(3)
        )


def test_softplus_matches_cuda_threshold() -> None:
    """softplus(x) = log1p(exp(x)) for x <= 20 and exactly x above, as in the CUDA kernel."""
    raw = torch.tensor([[[-3.0, 0.0, 20.0, 20.5, 60.0]]], dtype=torch.float64)
    by_hand = torch.tensor(
        [[[math.log1p(math.exp(-3.0)), math.log(2.0), math.log1p(math.exp(20.0)), 20.5, 60.0]]], dtype=torch.float64
    )
    x = scan_inputs(5, None, dim=1, batch=1)
    for scan in (selective_scan_ref, selective_scan_naive):
        soft = scan(x["u"], raw, x["A"], x["B"], x["C"], delta_softplus=True, return_last_state=True)
        plain = scan(x["u"], by_hand, x["A"], x["B"], x["C"], return_last_state=True)
        # 1e-13 resolves the ~6e-11 relative gap between log1p(exp(20.5)) and 20.5 at the thresholded step.
        for a, b in zip(soft, plain, strict=True):
            assert_relative(a, b, 1e-13)


@pytest.mark.parametrize("scan", [selective_scan_ref, selective_scan_naive])
def test_grouped_channels_use_group_c_div_dim_per_group(scan) -> None:
    """With G=2 groups over 4 channels, channels 0-1 see group 0 and channels 2-3 group 1 (c // (D/G))."""
    x = scan_inputs(11, 2, seed=9)
    out, state = scan(**x, delta_softplus=True, return_last_state=True)
    for group, channels in enumerate((slice(0, 2), slice(2, 4))):
        part = {
            k: v[:, channels] if k in ("u", "delta", "z") else v[channels] for k, v in x.items() if k not in ("B", "C")
        }
        part_out, part_state = scan(
            **part, B=x["B"][:, group], C=x["C"][:, group], delta_softplus=True, return_last_state=True
        )
        assert_relative(out[:, channels], part_out, 1e-14)
        assert_relative(state[:, channels], part_state, 1e-14)


@pytest.mark.parametrize("groups", [None, 2])
def test_reverse_is_flip_scan_flip(groups: int | None) -> None:
    x = scan_inputs(33, groups, seed=5)
    flip = {k: (v.flip(-1) if k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
    out, state = selective_scan_ref(**x, delta_softplus=True, return_last_state=True, reverse=True)
    out_flipped, state_flipped = selective_scan_ref(**flip, delta_softplus=True, return_last_state=True)
    assert_relative(out, out_flipped.flip(-1), 1e-12)
    assert_relative(state, state_flipped, 1e-12)


def _grads(scan, x: dict[str, torch.Tensor], loss_on: str, reverse: bool) -> list[torch.Tensor]:
    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    out, state = scan(**leaves, delta_softplus=True, return_last_state=True, reverse=reverse)
    weight_out = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    weight_state = torch.linspace(2, -1, state.numel(), dtype=state.dtype).reshape(state.shape)
    loss = {"out": (out * weight_out).sum(), "state": (state * weight_state).sum()}
    total = loss["out"] + loss["state"] if loss_on == "both" else loss[loss_on]
    return list(torch.autograd.grad(total, list(leaves.values()), allow_unused=True, materialize_grads=True))


@pytest.mark.parametrize("seqlen", [1, 7, 40])
@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("loss_on", ["out", "state", "both"])
def test_gradients_equal_naive_fp64(seqlen: int, groups: int | None, reverse: bool, loss_on: str) -> None:
    x = scan_inputs(seqlen, groups, seed=seqlen + 3 * reverse)
    for name, got, want in zip(
        x,
        _grads(selective_scan_ref, x, loss_on, reverse),
        _grads(selective_scan_naive, x, loss_on, reverse),
        strict=True,
    ):
        assert got.shape == x[name].shape
        if loss_on == "state" and name in ("D", "z"):  # the state does not depend on the skip or the gate
            assert torch.count_nonzero(got) == 0 and torch.count_nonzero(want) == 0
            continue
        assert_relative(got, want, 1e-10)


def test_gradcheck_ref() -> None:
    """Finite differences confirm the hand-written backward independently of the naive oracle."""
    x = scan_inputs(5, 2, dim=2, dstate=2, batch=1, seed=11)
    names = list(x)

    def fn(*tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return selective_scan_ref(**dict(zip(names, tensors, strict=True)), delta_softplus=True, return_last_state=True)

    leaves = tuple(v.clone().requires_grad_() for v in x.values())
    assert torch.autograd.gradcheck(fn, leaves)


def test_grad_dtypes_follow_inputs() -> None:
    """bf16 activations get bf16 gradients, fp32 parameters fp32 ones (autograd casts back through `.to`)."""
    x = scan_inputs(9, None, dtype=torch.bfloat16)
    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    selective_scan_ref(**leaves, delta_softplus=True).float().sum().backward()
    for name, leaf in leaves.items():
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, name
        assert torch.isfinite(leaf.grad).all(), name


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("reverse", [False, True])
def test_low_precision_inputs_accumulate_in_fp32(dtype: torch.dtype, tol: float, reverse: bool) -> None:
    """Realistic ViM-like values (N=16, A=-(1..N), delta=softplus(raw <= 5), L=197) against fp64 on the same inputs.

    The output is rounded to the input dtype once, so its error is about that dtype's epsilon; the fp32 state shows
    the accumulation itself was fp32 (bf16 accumulation over 197 steps would be far off).
    """
    dim, dstate, seqlen = 8, 16, 197
    x = scan_inputs(seqlen, None, dtype=dtype, dim=dim, dstate=dstate, seed=42)
    x["A"] = -torch.arange(1, dstate + 1, dtype=torch.float32).repeat(dim, 1)
    x["delta"] = (torch.rand(x["delta"].shape, generator=torch.Generator().manual_seed(1)) * 9 - 4).to(dtype)
    exact = {k: v.double() for k, v in x.items()}
    out, state = selective_scan_ref(**x, delta_softplus=True, return_last_state=True, reverse=reverse)
    out64, state64 = selective_scan_naive(**exact, delta_softplus=True, return_last_state=True, reverse=reverse)
    assert out.dtype == dtype and state.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(state).all()
    assert_relative(out, out64, tol)
    assert_relative(state, state64, 1e-5)


def test_fp32_stable_for_extreme_decays() -> None:
    """Steps that wipe the state (delta*A ~ -1e4) underflow to exactly 0 decay instead of overflowing."""
    x = scan_inputs(50, None, dtype=torch.float32, dstate=64, seed=3)
    x["A"] = -torch.linspace(1, 256, 64).repeat(DIM, 1)
    x["delta"] = torch.full_like(x["delta"], 40.0)
    out, state = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    out64 = selective_scan_naive(**{k: v.double() for k, v in x.items()}, delta_softplus=True)
    assert torch.isfinite(out).all() and torch.isfinite(state).all()
    assert_relative(out, out64, 1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"u": torch.zeros(2, 4)}, "u must be"),
        ({"delta": torch.zeros(2, 4, 7, dtype=torch.float32)}, "delta must match"),
        ({"A": torch.zeros(4, 3, dtype=torch.float16)}, "A must be"),
        ({"A": torch.zeros(5, 3, dtype=torch.float64)}, "A must be"),
        ({"B": torch.zeros(2, 3, 3, 7, dtype=torch.float64)}, "groups G=3 must divide"),
        ({"C": torch.zeros(2, 3, 8, dtype=torch.float64)}, "C must be"),
        ({"B": torch.zeros(4, 3, dtype=torch.float64)}, "B must be"),
        ({"D": torch.zeros(3, dtype=torch.float64)}, "D must be"),
        ({"z": torch.zeros(2, 4, 6, dtype=torch.float64)}, "z must be"),
        ({"delta_bias": torch.zeros(4, dtype=torch.int64)}, "delta_bias must be"),
    ],
)
def test_invalid_arguments_raise_value_error(change: dict[str, torch.Tensor], message: str) -> None:
    x = scan_inputs(7, None) | change
    for scan in (selective_scan_ref, selective_scan_naive):
        with pytest.raises(ValueError, match=message):
            scan(**x)


def test_empty_sequence_rejected() -> None:
    x = scan_inputs(1, None)
    x = {k: (v[..., :0] if k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
    with pytest.raises(ValueError, match="seqlen must be >= 1"):
        selective_scan_ref(**x)


def _conv_inputs(width: int, seqlen: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(width * 100 + seqlen)
    return (
        torch.randn(2, 5, seqlen, generator=gen, dtype=torch.float64),
        torch.randn(5, width, generator=gen, dtype=torch.float64),
        torch.randn(5, generator=gen, dtype=torch.float64),
    )


@pytest.mark.parametrize(("width", "seqlen"), [(4, 9), (4, 2), (1, 5), (3, 1)])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_matches_padded_conv(width: int, seqlen: int, activation: str | None) -> None:
    x, weight, bias = _conv_inputs(width, seqlen)
    expected = F.conv1d(x, weight[:, None, :], bias, padding=width - 1, groups=5)[..., :seqlen]
    expected = F.silu(expected) if activation else expected
    torch.testing.assert_close(causal_conv1d(x, weight, bias, activation=activation), expected)
    torch.testing.assert_close(causal_conv1d(x, weight[:, None, :], bias, activation=activation), expected)


def test_causal_conv1d_is_causal_by_hand() -> None:
    """weight [w0, w1, w2] on x = [1, 2, 3, 4]: out[t] = w0*x[t-2] + w1*x[t-1] + w2*x[t]."""
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    weight = torch.tensor([[1.0, 10.0, 100.0]])
    torch.testing.assert_close(causal_conv1d(x, weight), torch.tensor([[[100.0, 210.0, 321.0, 432.0]]]))
    # anti-causal: out[t] = w2*x[t] + w1*x[t+1] + w0*x[t+2]
    torch.testing.assert_close(causal_conv1d(x, weight, reverse=True), torch.tensor([[[123.0, 234.0, 340.0, 400.0]]]))


@pytest.mark.parametrize(("width", "seqlen"), [(4, 9), (4, 2), (2, 1)])
def test_reverse_conv_is_flip_conv_flip(width: int, seqlen: int) -> None:
    x, weight, bias = _conv_inputs(width, seqlen)
    expected = causal_conv1d(x.flip(-1), weight, bias, activation="silu").flip(-1)
    torch.testing.assert_close(causal_conv1d(x, weight, bias, activation="silu", reverse=True), expected)


def test_causal_conv1d_rejects_bad_arguments() -> None:
    x, weight, bias = _conv_inputs(4, 6)
    with pytest.raises(ValueError, match="x must be"):
        causal_conv1d(x[0], weight)
    with pytest.raises(ValueError, match="weight must be"):
        causal_conv1d(x, weight[:3])
    with pytest.raises(ValueError, match="bias must be"):
        causal_conv1d(x, weight, bias[:2])
    with pytest.raises(ValueError, match="activation must be"):
        causal_conv1d(x, weight, activation="relu")
