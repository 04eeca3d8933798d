"""Selective subcloning: the engine keeps the channels a constructed teacher makes important, deterministically."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests._ckpt_factory import SMALL, make_vit_state_dict
from tmconvert.converter.convert.subclone import (
    activation_scores,
    choose,
    top_k_sorted,
    uniform_indices,
)
from tmconvert.converter.data.calibration import calibration_batches, parse_calib
from tmconvert.converter.data.errors import DatasetError
from tmconvert.converter.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from tmconvert.converter.plan.plan import IndexSetPlan
from tmconvert.models import VisionTransformer

RESIDUAL = IndexSetPlan("residual", full=32, keep=8, per="model", score="residual", blocks=(None,))
HIDDEN = IndexSetPlan("hidden", full=128, keep=16, per="block", score="mlp_hidden", blocks=(0, 1))
VALUE = IndexSetPlan("value", full=32, keep=8, per="block", score="attn_value", blocks=(1,))
PLANTED_RESIDUAL = [2, 5, 11, 12, 19, 23, 28, 31]
PLANTED_HIDDEN = {0: list(range(3, 128, 8)), 1: list(range(100, 116))}
PLANTED_VALUE = [0, 4, 9, 10, 15, 20, 26, 30]


def test_top_k_breaks_ties_by_index_and_returns_sorted():
    scores = torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0, 2.0])
    assert top_k_sorted(scores, 2).tolist() == [1, 2]  # three 3.0s: the two lowest indices win
    assert top_k_sorted(scores, 4).tolist() == [1, 2, 4, 5]
    assert top_k_sorted(scores, 6).tolist() == list(range(6))
    assert top_k_sorted(torch.zeros(5), 3).tolist() == [0, 1, 2]


def test_uniform_is_evenly_spaced():
    assert uniform_indices(32, 16).tolist() == list(range(0, 32, 2))
    assert uniform_indices(10, 3).tolist() == [0, 3, 6]
    assert uniform_indices(7, 7).tolist() == list(range(7))


def _planted_magnitude_teacher() -> dict[str, torch.Tensor]:
    sd = make_vit_state_dict(SMALL, seed=3)
    for b in range(SMALL.depth):
        pre = f"blocks.{b}."
        sd[pre + "mlp.fc2.weight"][PLANTED_RESIDUAL] *= 10  # rows writing the planted residual channels
        sd[pre + "attn.qkv.weight"][:, PLANTED_RESIDUAL] *= 10  # columns reading them
        sd[pre + "mlp.fc1.weight"][PLANTED_HIDDEN[b]] *= 10
        sd[pre + "mlp.fc2.weight"][:, PLANTED_HIDDEN[b]] *= 10
    v_rows = [2 * SMALL.embed_dim + c for c in PLANTED_VALUE]
    sd["blocks.1.attn.qkv.weight"][v_rows] *= 10
    return sd


def test_magnitude_scores_pick_planted_channels():
    sd = _planted_magnitude_teacher()
    selection = choose([RESIDUAL, HIDDEN, VALUE], "magnitude", get=sd.__getitem__, cfg=SMALL)
    assert selection["residual"][None].tolist() == PLANTED_RESIDUAL
    assert selection["hidden"][0].tolist() == PLANTED_HIDDEN[0]
    assert selection["hidden"][1].tolist() == PLANTED_HIDDEN[1]
    assert selection["value"][1].tolist() == PLANTED_VALUE
    again = choose([RESIDUAL, HIDDEN, VALUE], "magnitude", get=sd.__getitem__, cfg=SMALL)
    assert all(torch.equal(selection[k][b], again[k][b]) for k in selection for b in selection[k])


def _planted_activation_teacher() -> dict[str, torch.Tensor]:
    """Weights are i.i.d.; only biases make some channels fire: visible to activations, invisible to magnitudes."""
    sd = make_vit_state_dict(SMALL, seed=4)
    for name, tensor in sd.items():
        if name.endswith(".bias"):
            tensor.zero_()
        elif tensor.dim() >= 2:
            tensor.mul_(0.02)  # timm-like init scale, so the planted biases dominate the activations
        else:
            tensor.fill_(1.0)  # LayerNorm weights
    sd["patch_embed.proj.bias"][PLANTED_RESIDUAL] = 50.0  # the residual stream carries them in every block
    for b in range(SMALL.depth):
        sd[f"blocks.{b}.mlp.fc1.bias"][PLANTED_HIDDEN[b]] = 20.0  # GELU(20) = 20: large outputs
    sd["blocks.1.attn.qkv.bias"][[2 * SMALL.embed_dim + c for c in PLANTED_VALUE]] = 30.0
    return sd


def _teacher(sd: dict[str, torch.Tensor]) -> VisionTransformer:
    teacher = VisionTransformer(SMALL, device="meta")
    teacher.load_state_dict(sd, strict=True, assign=True)
    return teacher


def test_activation_scores_pick_planted_channels():
    sd = _planted_activation_teacher()
    teacher = _teacher(sd)
    batches = calibration_batches(6, SMALL, seed=0)
    acts = activation_scores([RESIDUAL, HIDDEN, VALUE], teacher, batches)
    assert acts[("residual", None)].shape == (32,) and acts[("mlp_hidden", 0)].shape == (128,)
    selection = choose([RESIDUAL, HIDDEN, VALUE], "activation", get=sd.__getitem__, cfg=SMALL, activations=acts)
    assert selection["residual"][None].tolist() == PLANTED_RESIDUAL
    assert selection["hidden"][0].tolist() == PLANTED_HIDDEN[0]
    assert selection["hidden"][1].tolist() == PLANTED_HIDDEN[1]
    assert selection["value"][1].tolist() == PLANTED_VALUE
    # the weights carry no plant, so magnitude scores do not find them
    by_weight = choose([HIDDEN], "magnitude", get=sd.__getitem__, cfg=SMALL)
    assert by_weight["hidden"][0].tolist() != PLANTED_HIDDEN[0]


def test_activation_score_is_mean_abs_gelu_of_fc1():
    sd = make_vit_state_dict(SMALL, seed=5)
    teacher = _teacher(sd)
    images = next(calibration_batches(3, SMALL, seed=1))
    acts = activation_scores([HIDDEN], teacher, iter([images]))
    captured = []
    hook = teacher.blocks[1].mlp.fc1.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        teacher(images)
    hook.remove()
    expected = torch.nn.functional.gelu(captured[0]).abs().mean(dim=(0, 1))
    torch.testing.assert_close(acts[("mlp_hidden", 1)], expected, rtol=1e-5, atol=1e-6)


def test_identity_selection_when_nothing_shrinks():
    sd = make_vit_state_dict(SMALL, seed=6)
    same = IndexSetPlan("residual", full=32, keep=32, per="model", score="residual", blocks=(None,))
    for method in ("magnitude", "uniform"):
        assert choose([same], method, get=sd.__getitem__, cfg=SMALL)["residual"][None].tolist() == list(range(32))


def test_calibration_folder_and_synthetic(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(folder / "a.png")
    Image.new("L", (20, 20), 128).save(folder / "b.jpg")  # grey: becomes 3 channels
    (folder / "notes.txt").write_text("not an image")
    assert parse_calib(str(folder)) == str(folder) and parse_calib("5") == 5 and parse_calib(None) is None
    (batch,) = list(calibration_batches(str(folder), SMALL, seed=0))
    assert batch.shape == (2, 3, 16, 16)
    red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(batch[0, :, 8, 8], red)
    grey = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(batch[1, :, 5, 5], grey, atol=2e-2, rtol=0)

    noise_a = torch.cat(list(calibration_batches(20, SMALL, seed=7)))
    noise_b = torch.cat(list(calibration_batches(20, SMALL, seed=7)))
    assert noise_a.shape == (20, 3, 16, 16) and torch.equal(noise_a, noise_b)
    assert not torch.equal(noise_a, torch.cat(list(calibration_batches(20, SMALL, seed=8))))


def test_calibration_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such data folder"):
        parse_calib(str(tmp_path / "missing"))
    with pytest.raises(DatasetError, match=r"^--calib 0: give 1 to 512 synthetic images$"):
        parse_calib("0")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no images"):
        list(calibration_batches(str(empty), SMALL, seed=0))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(np.arange(10, dtype=np.uint8).tobytes())
    with pytest.raises(DatasetError, match=r"x\.png: cannot read image"):
        list(calibration_batches(str(broken), SMALL, seed=0))
