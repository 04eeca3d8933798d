"""`tmconvert inspect`: the facts on stdout (text and --json), one-line errors on stderr with exit code 1."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tests._ckpt_factory import SMALL, make_vit_state_dict, write_checkpoint
from tmconvert.converter.checkpoint.errors import UnsafePickleError
from tmconvert.converter.cli import main

DEEP = dataclasses.replace(SMALL, depth=12, distilled=True)


@pytest.fixture
def deit_training_checkpoint(tmp_path: Path) -> Path:
    return write_checkpoint(
        make_vit_state_dict(DEEP),
        tmp_path / "checkpoint.pth",
        fmt="torch-zip",
        container="deit-train",
        wrapper_prefix="module.",
    )


def test_text_output_summarises_a_deit_training_checkpoint(
    deit_training_checkpoint: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # the summary wraps long lines to the terminal width
    assert main(["inspect", str(deit_training_checkpoint), "--heads", "2"]) == 0
    out = capsys.readouterr().out
    state_dict = make_vit_state_dict(DEEP)
    for fact in [
        "torch-zip",
        "model (entries: model, optimizer, lr_scheduler, epoch, model_ema, scaler, args)",
        "naming        timm",
        "vit (DeiT distilled)",
        "embed_dim 32, depth 12, heads 2 (head_dim 16), mlp_hidden 128, patch 4, image 16×16 (grid 4×4)",
        "tokens cls+dist",
        f"{sum(t.numel() for t in state_dict.values()):,} in {len(state_dict)} tensors",
        f"float32 ×{len(state_dict)}",
        f"({deit_training_checkpoint.stat().st_size:,} B) in 1 file(s)",
        "grid 4×4: pos_embed's 16 patch positions assumed square",
    ]:
        assert fact in out, fact
    # deep models: blocks.0 stands for all blocks unless --all
    assert "blocks.0.attn.qkv.weight" in out and "blocks.1 … blocks.11" in out and "blocks.7.mlp" not in out
    assert "head_dist.bias" in out


def test_all_lists_every_tensor(deit_training_checkpoint: Path, capsys) -> None:
    assert main(["inspect", str(deit_training_checkpoint), "--heads", "2", "--all"]) == 0
    out = capsys.readouterr().out
    assert "blocks.11.mlp.fc2.bias" in out and "blocks.1 … blocks.11" not in out


def test_ema_flag_reads_model_ema(deit_training_checkpoint: Path, capsys) -> None:
    assert main(["inspect", str(deit_training_checkpoint), "--heads", "2", "--ema", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["container"] == "model_ema"


def test_json_has_the_same_facts_and_every_tensor(tmp_path: Path, capsys) -> None:
    cfg = dataclasses.replace(SMALL, num_heads=4, num_classes=0)
    state_dict = make_vit_state_dict(cfg)
    path = write_checkpoint(
        state_dict, tmp_path / "hf", fmt="hf-dir-sharded", naming="hf-legacy", hf_prefix="", pooler=True, config=cfg
    )
    assert main(["inspect", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    facts = json.loads(captured.out)
    assert captured.err == ""
    assert facts["format"] == "hf-dir" and facts["weights_format"] == "safetensors-sharded"
    assert facts["container"] == "flat" and facts["naming"] == "hf-legacy" and facts["family"] == "vit"
    assert facts["config"] == {
        **dataclasses.asdict(cfg),
        "img_size": [16, 16],
        "norm_eps": 1e-12,
        "grid": [4, 4],
        "num_patches": 16,
        "num_prefix_tokens": 1,
        "pos_prefix_tokens": 1,
        "head_dim": 8,
    }
    assert facts["layout"] == "vit" and facts["mappings"] == [
        {"name": "vit-plainmamba-mlp", "target": "plainmamba", "default": True},
        {"name": "vit-videomamba-mlp", "target": "videomamba", "default": True},
        {"name": "vit-vim-mlp", "target": "vim", "default": True},
        {"name": "vit-vmamba", "target": "vmamba", "default": True},
        {"name": "vit-vim-attn", "target": "vim", "default": False},
        {"name": "vit-vim-interleaved", "target": "vim", "default": False},
    ]
    assert facts["config_file"] == str(path / "config.json")
    assert facts["num_params"] == sum(t.numel() for t in state_dict.values())
    assert facts["num_tensors"] == len(state_dict) == len(facts["tensors"])
    assert facts["dtypes"] == {"float32": len(state_dict)}
    assert facts["size_on_disk"] == sum(
        (path / name).stat().st_size
        for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    )
    assert facts["notes"] == ["norm eps 1e-12: the Hugging Face default (no config.json gives layer_norm_eps)"]
    assert [t["name"] for t in facts["ignored"]] == ["pooler.dense.bias", "pooler.dense.weight"]
    by_name = {t["name"]: t for t in facts["tensors"]}
    assert by_name.keys() == state_dict.keys()
    assert by_name["blocks.1.attn.qkv.weight"] == {
        "name": "blocks.1.attn.qkv.weight",
        "shape": [96, 32],
        "dtype": "float32",
        "nbytes": 96 * 32 * 4,
        "source": [f"encoder.layer.1.attention.attention.{p}.weight" for p in ("query", "key", "value")],
    }


@pytest.mark.parametrize(
    "fmt",
    [
        "safetensors",
        "safetensors-sharded",
        "torch-zip",
        "torch-legacy",
        "torch-sharded",
        "hf-dir",
        "hf-dir-bin",
        "hf-dir-bin-sharded",
    ],
)
def test_every_format_inspects(tmp_path: Path, fmt: str, capsys) -> None:
    path = write_checkpoint(make_vit_state_dict(SMALL), tmp_path / "x", fmt=fmt, naming="hf-v5", config=SMALL)
    assert main(["inspect", str(path), "--heads", "2", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["naming"] == "hf-v5" and facts["config"]["depth"] == 2 and len(facts["tensors"]) == 32


def test_wide_terminal_shows_stored_names(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "160")
    path = write_checkpoint(make_vit_state_dict(SMALL), tmp_path / "x.safetensors", naming="hf-legacy")
    assert main(["inspect", str(path), "--heads", "2"]) == 0
    assert "vit.encoder.layer.0.attention.attention.{query,key,value}.weight" in capsys.readouterr().out


def _unsafe_pickle(tmp_path: Path) -> Path:
    class Payload:
        def __reduce__(self) -> tuple[object, tuple[object, ...]]:
            return eval, ("1",)

    torch.save({"model": make_vit_state_dict(SMALL), "args": Payload()}, tmp_path / "evil.pth")
    return tmp_path / "evil.pth"


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda tmp: tmp / "missing.pth", "missing.pth: no such file or directory"),
        (lambda tmp: (tmp / "folder").mkdir() or tmp / "folder", "folder: folder holds no weights"),
        (_unsafe_pickle, "evil.pth: refused to unpickle: it asks for the global 'builtins.eval'"),
        (
            lambda tmp: torch.save({"conv1.weight": torch.zeros(1)}, tmp / "r.pth") or tmp / "r.pth",
            "r.pth: not a ViT/DeiT checkpoint",
        ),
        (lambda tmp: torch.save({}, tmp / "e.pth") or tmp / "e.pth", "e.pth: empty state dict"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_exit_1(tmp_path: Path, capsys, make, expected: str) -> None:
    path = make(tmp_path)
    assert main(["inspect", str(path), "--heads", "2"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and expected in captured.err
    assert captured.err.count("\n") == 1 and captured.err.endswith("\n")  # one line, no traceback


def test_debug_shows_the_exception_instead(tmp_path: Path) -> None:
    with pytest.raises(UnsafePickleError):
        main(["--debug", "inspect", str(_unsafe_pickle(tmp_path))])


def test_usage_errors_exit_2(tmp_path: Path, capsys) -> None:
    path = write_checkpoint(make_vit_state_dict(SMALL), tmp_path / "x.safetensors")
    assert main(["inspect"]) == 2
    assert main(["inspect", str(path), "--heads", "0"]) == 2
    assert main(["inspect", str(path), "--no-such-flag"]) == 2
