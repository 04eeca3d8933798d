"""Every target family runs on the Triton scan as on the reference: same logits and same gradients (float32, tiny
configs). On the CPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1, as bin/test sets); on a GPU the
compiled kernels."""

from __future__ import annotations

import pytest
import torch

from tmconvert.kernels import available_backends, use_backend
from tmconvert.models import build_model

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TINY = {
    "vim-t": ({"embed_dim": 16, "depth": 2, "img_size": 32, "num_classes": 3}, (2, 3, 32, 32)),
    "plainmamba-l1": (
        {"embed_dim": 16, "depth": 2, "img_size": 32, "num_classes": 3, "stem_channels": 8},
        (2, 3, 32, 32),
    ),
    "videomamba-ti": (
        {"embed_dim": 16, "depth": 2, "img_size": 32, "num_frames": 2, "num_classes": 3},
        (2, 3, 2, 32, 32),
    ),
    "vmamba-t": ({"dims": (8, 16), "depths": (1, 1), "img_size": 32, "num_classes": 3}, (2, 3, 32, 32)),
}


def _run(name: str, backend: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    overrides, shape = TINY[name]
    model = build_model(name, seed=0, **overrides).to(DEVICE).eval()  # eval: BatchNorm statistics stay as built
    images = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with use_backend(backend):
        logits = model(images)
        logits.pow(2).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.skipif("triton" not in available_backends(DEVICE), reason="Triton needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("name", sorted(TINY))
def test_triton_scan_matches_reference_in_every_family(name: str) -> None:
    ref_logits, ref_grads = _run(name, "reference")
    tri_logits, tri_grads = _run(name, "triton")
    torch.testing.assert_close(tri_logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert tri_grads.keys() == ref_grads.keys() and len(ref_grads) > 10
    for param, grad in ref_grads.items():
        torch.testing.assert_close(tri_grads[param], grad, rtol=1e-3, atol=1e-5, msg=lambda m, p=param: f"{p}: {m}")


@pytest.mark.skipif("triton" not in available_backends(DEVICE), reason="Triton needs a GPU or TRITON_INTERPRET=1")
def test_compiled_model_on_the_triton_scan_matches_eager() -> None:
    """`torch.compile` of a whole model works with the Triton scan inside (a graph break at the scan) and changes no
    number beyond float32 reordering."""
    overrides, shape = TINY["vim-t"]
    model = build_model("vim-t", seed=0, **overrides).to(DEVICE).eval()
    images = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with use_backend("triton"):
        eager = model(images)
        eager.pow(2).sum().backward()
        eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        compiled = torch.compile(model)(images)
        compiled.pow(2).sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    for param, grad in eager_grads.items():
        torch.testing.assert_close(model.get_parameter(param).grad, grad, rtol=1e-3, atol=1e-5)
