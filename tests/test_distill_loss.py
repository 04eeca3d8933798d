"""The loss pieces, numerically: adaptive weights, KD, token alignment, multi-directional ordering, projectors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tmconvert.converter.distill.errors import RunError
from tmconvert.converter.distill.loss import (
    DistillationLoss,
    FeatureAlignment,
    adaptive_weights,
    kd_loss,
    make_projector,
    masked_token_cosine,
    token_alignment,
)
from tmconvert.models.vim import VimConfig, VisionMamba
from tmconvert.models.vit import ViTConfig

VIM = VimConfig(embed_dim=8, depth=2, d_state=4, patch_size=4, img_size=(16, 16), num_classes=10)  # E = 16
VIT = ViTConfig(embed_dim=16, depth=2, num_heads=2, mlp_hidden=32, patch_size=4, img_size=(16, 16), num_classes=10)


def test_adaptive_weights_follow_the_formula_and_favour_low_similarity():
    sims = torch.tensor([0.5, 0.25, 1.0])
    # w_i = (sum c) / c_i = 1.75 / c = [3.5, 7, 1.75]; normalised to mean 1: [6/7, 12/7, 3/7]
    torch.testing.assert_close(adaptive_weights(sims), torch.tensor([6 / 7, 12 / 7, 3 / 7]))
    raw = sims.sum() / sims
    torch.testing.assert_close(adaptive_weights(sims), raw * 3 / raw.sum())
    assert adaptive_weights(sims).argmax() == 1  # the least similar layer gets the most weight


def test_adaptive_weights_clamp_non_positive_similarity_and_carry_no_gradient():
    sims = torch.tensor([-0.2, 0.5], requires_grad=True)
    weights = adaptive_weights(sims, min_similarity=0.05)
    # c -> [0.05, 0.5]; 1/c = [20, 2] -> normalised to mean 1: [40/22, 4/22]
    torch.testing.assert_close(weights, torch.tensor([40 / 22, 4 / 22]))
    assert not weights.requires_grad


def test_kd_loss_is_temperature_scaled_kl():
    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    t = 2.0
    p_t = F.softmax(teacher / t, dim=-1)
    expected = (p_t * (p_t.log() - F.log_softmax(student / t, dim=-1))).sum(-1).mean() * t * t
    torch.testing.assert_close(kd_loss(student, teacher, t), expected)
    assert kd_loss(teacher, teacher, t).abs() < 1e-6


def test_token_alignment_moves_the_cls_to_the_middle():
    index, valid = token_alignment(VIM.token_layout(), VIT.token_layout())
    assert valid.all() and index.shape == (17,)
    assert index[8] == 0  # ViM cls (middle, P // 2 = 8) <- ViT cls (index 0)
    assert index[:8].tolist() == list(range(1, 9))  # patches 0..7
    assert index[9:].tolist() == list(range(9, 17))  # patches 8..15 sit after the ViM cls


def test_token_alignment_without_teacher_cls_and_with_other_grid():
    avg_teacher = ViTConfig(**{**VIT.__dict__, "class_token": False, "global_pool": "avg"})
    index, valid = token_alignment(VIM.token_layout(), avg_teacher.token_layout())
    assert not valid[8] and valid.sum() == 16 and index[0] == 0
    with pytest.raises(RunError, match="patch grid 4x4 differs from the teacher's 2x2"):
        token_alignment(VIM.token_layout(), ViTConfig(**{**VIT.__dict__, "patch_size": 8}).token_layout())


def _alignment(pairs, **kw) -> FeatureAlignment:
    model = VisionMamba(VIM, device="meta")
    index, valid = token_alignment(VIM.token_layout(), VIT.token_layout())
    return FeatureAlignment(
        pairs,
        model.scan_orders(),
        index,
        valid,
        student_width=VIM.d_inner,
        teacher_width=VIT.embed_dim,
        projector="identity",
        **kw,
    )


def _student_tokens(teacher: torch.Tensor) -> torch.Tensor:
    """Teacher (B, T, D) tokens rearranged into the ViM layout (cls in the middle)."""
    index, _ = token_alignment(VIM.token_layout(), VIT.token_layout())
    return teacher[:, index]


def test_backward_branch_is_aligned_with_the_reversed_teacher_tokens():
    torch.manual_seed(0)
    teacher = [torch.randn(2, 17, 16), torch.randn(2, 17, 16)]
    aligned = _alignment([(0, 0), (1, 1)])
    in_layout = [_student_tokens(t) for t in teacher]
    # the student's branch outputs come in scan order: fwd visits tokens 0..L-1, bwd visits L-1..0
    correct = [{"fwd": tok, "bwd": tok.flip(1)} for tok in in_layout]
    out = aligned(correct, teacher)
    assert out.loss.abs() < 1e-6
    for name in ("fwd", "bwd"):
        torch.testing.assert_close(out.similarities[name], torch.ones(2))
    unreversed = [{"fwd": tok, "bwd": tok} for tok in in_layout]  # bwd output compared in the wrong order
    wrong = aligned(unreversed, teacher)
    assert wrong.loss > 0.3 and wrong.similarities["fwd"].min() > 0.999 and wrong.similarities["bwd"].max() < 0.5
    raw_layout = [{"fwd": t, "bwd": t.flip(1)} for t in teacher]  # teacher order without moving the cls
    assert aligned(raw_layout, teacher).loss > 0.01


def test_weights_per_direction_and_switches():
    torch.manual_seed(0)
    teacher = [torch.randn(2, 17, 16) for _ in range(2)]
    tok = [_student_tokens(t) for t in teacher]
    far = tok[1] + 2 * torch.randn_like(tok[1])
    noisy = [{"fwd": tok[0], "bwd": tok[0].flip(1)}, {"fwd": far, "bwd": tok[1].flip(1)}]
    out = _alignment([(0, 0), (1, 1)])(noisy, teacher)
    c = out.similarities["fwd"]
    assert c[0] > 0.999 and c[1] < 0.7
    assert out.weights["fwd"][1] > out.weights["fwd"][0]  # the less similar layer weighs more
    torch.testing.assert_close(out.weights["bwd"], torch.ones(2))  # equal similarities: equal weights
    expected_fwd = (out.weights["fwd"] * (1 - c)).mean()
    torch.testing.assert_close(out.loss, expected_fwd / 2, atol=1e-6, rtol=1e-5)  # mean over directions, bwd exact
    uniform = _alignment([(0, 0), (1, 1)], adaptive=False)(noisy, teacher)
    torch.testing.assert_close(uniform.weights["fwd"], torch.ones(2))
    torch.testing.assert_close(uniform.loss, (1 - c).mean() / 2, atol=1e-6, rtol=1e-5)
    forward_only = _alignment([(0, 0), (1, 1)], multi_directional=False)(noisy, teacher)
    assert list(forward_only.similarities) == ["fwd"]
    torch.testing.assert_close(forward_only.loss, expected_fwd, atol=1e-6, rtol=1e-5)


def test_gradient_treats_the_adaptive_weights_as_constants():
    torch.manual_seed(0)
    teacher = [torch.randn(1, 17, 16)]
    student = torch.randn(1, 17, 16, requires_grad=True)
    aligned = _alignment([(0, 0)], multi_directional=False)
    out = aligned([{"fwd": student}], teacher)
    out.loss.backward()
    # one pair: weight 1; d(1 - cos)/dx only
    ref = student.detach().clone().requires_grad_(True)
    (1 - F.cosine_similarity(ref, _student_tokens(teacher[0]), dim=-1).mean()).backward()
    torch.testing.assert_close(student.grad, ref.grad)


def test_projectors():
    assert isinstance(make_projector("auto", 16, 16), torch.nn.Identity)
    mlp = make_projector("auto", 32, 16)
    assert mlp(torch.randn(2, 5, 32)).shape == (2, 5, 16) and sum(p.numel() for p in mlp.parameters()) > 0
    padded = make_projector("pad", 8, 16)(torch.ones(1, 2, 8))
    assert padded.shape == (1, 2, 16) and padded[..., 8:].abs().sum() == 0
    assert make_projector("linear", 8, 16)(torch.ones(1, 2, 8)).shape == (1, 2, 16)
    with pytest.raises(RunError, match="identity needs equal widths"):
        make_projector("identity", 8, 16)
    with pytest.raises(RunError, match="pad needs"):
        make_projector("pad", 32, 16)


def test_total_loss_is_the_weighted_sum_and_pieces_switch_off():
    torch.manual_seed(0)
    teacher_layers = [torch.randn(2, 17, 16) for _ in range(2)]
    directions = [{"fwd": torch.randn(2, 17, 16), "bwd": torch.randn(2, 17, 16)} for _ in range(2)]
    s_logits, t_logits, labels = torch.randn(2, 10), torch.randn(2, 10), torch.tensor([3, 7])
    loss = DistillationLoss(
        task=0.5, kd=2.0, feature=3.0, label_smoothing=0.1, temperature=2.0, alignment=_alignment([(0, 0), (1, 1)])
    )
    out = loss(s_logits, directions, t_logits, teacher_layers, labels)
    ce = F.cross_entropy(s_logits, labels, label_smoothing=0.1)
    torch.testing.assert_close(out.parts["task"], ce)
    torch.testing.assert_close(out.parts["kd"], kd_loss(s_logits, t_logits, 2.0))
    expected = 0.5 * ce + 2.0 * out.parts["kd"] + 3.0 * out.parts["feature"]
    torch.testing.assert_close(out.total, expected)
    unlabelled = loss(s_logits, directions, t_logits, teacher_layers, None)
    assert "task" not in unlabelled.parts
    kd_only = DistillationLoss(task=0.0, kd=1.0, feature=0.0)
    out = kd_only(s_logits, None, t_logits, teacher_layers, labels)
    assert set(out.parts) == {"kd"} and not kd_only.needs_directions
    assert math.isclose(out.total.item(), out.parts["kd"].item(), rel_tol=1e-6)


def test_masked_token_cosine_averages_only_the_valid_tokens():
    student, teacher = torch.randn(3, 7, 5, dtype=torch.float64), torch.randn(3, 7, 5, dtype=torch.float64)
    valid = torch.tensor([True, False, True, True, False, True, True])
    expected = F.cosine_similarity(student[:, valid], teacher[:, valid], dim=-1).mean()
    assert masked_token_cosine(student, teacher, valid).item() == pytest.approx(expected.item(), rel=1e-6)
    everything = F.cosine_similarity(student, teacher, dim=-1).mean()
    assert masked_token_cosine(student, teacher, None).item() == pytest.approx(everything.item(), rel=1e-6)
