"""`tmconvert SOURCE --to TARGET` at the CLI: dry runs, JSON, `list`, and every kind of bad input."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from tests._ckpt_factory import SMALL, make_vit_state_dict, write_checkpoint
from tmconvert.converter.cli import main
from tmconvert.models import registry as registry_module
from tmconvert.models.registry import register
from tmconvert.models.vim import VimConfig

TARGET = "vim-test-cli"
MLP_MAPPING = Path(__file__).resolve().parents[1] / "mappings" / "vit-vim-mlp.yaml"


@pytest.fixture(autouse=True)
def tiny_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    register(TARGET, VimConfig(embed_dim=16, depth=3, d_state=4))


@pytest.fixture
def src(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    return write_checkpoint(make_vit_state_dict(SMALL, seed=0), folder / "teacher.safetensors")


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([*args, "--heads", "2"] if args and args[0] not in ("list", "check") else list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, src, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    before = _listing(tmp_path)
    code, out, _ = _run(capsys, str(src), "--to", TARGET, "--dry-run")
    assert code == 0 and _listing(tmp_path) == before
    assert "layers.{n}.mixer.in_proj.weight" in out and "blocks.{b}.mlp.fc1.weight" in out
    assert "dropped source tensors" in out and "blocks.{n}.attn.qkv.weight [0-1]" in out
    assert "0-1" in out and "none: default init" in out  # layer plan: 0-1 <- 0-1, layer 2 initialised
    assert "subcloned" in out and "peak memory" in out


def test_dry_run_json_is_the_plan(tmp_path, src, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = _run(capsys, str(src), "--to", TARGET, "--dry-run", "--json", "--layers", "1")
    assert code == 0
    plan = json.loads(out)
    assert [row["block"] for row in plan["layers"]] == [0, None, None]
    assert plan["counts"]["initialised"] + plan["counts"]["subcloned"] + plan["counts"]["inherited"] == len(
        plan["tensors"]
    )
    names = {t["name"]: t for t in plan["tensors"]}
    assert names["layers.0.mixer.in_proj.weight"]["kind"] == "subcloned"
    assert names["layers.1.mixer.in_proj.weight"]["kind"] == "initialised"
    assert "blocks.1.mlp.fc1.weight" in plan["dropped"]  # block 1 feeds nothing with --layers 1
    assert plan["partly_used"]["blocks.0.mlp.fc1.weight"] == pytest.approx(32 / 128 * 16 / 32)
    assert plan["index_sets"]["residual"] == {
        "full": 32,
        "keep": 16,
        "per": "model",
        "score": "residual",
        "blocks": [None],
    }
    assert plan["output_bytes"] == sum(4 * _numel(t["shape"]) for t in plan["tensors"])
    assert not list(tmp_path.glob("*.safetensors"))


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def test_convert_json_report_and_existing_output(tmp_path, src, capsys):
    out = tmp_path / "vim.safetensors"
    code, stdout, _ = _run(capsys, str(src), "--to", TARGET, "--out", str(out), "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["outputs"] == [str(out), str(tmp_path / "vim.config.json")]
    assert report["verification"]["strict_load"] is True
    before = out.read_bytes()
    code, _, err = _run(capsys, str(src), "--to", TARGET, "--out", str(out), "--seed", "4")
    assert code == 1 and "exists; pass --force" in err and str(out) in err
    assert out.read_bytes() == before
    assert _run(capsys, str(src), "--to", TARGET, "--out", str(out), "--seed", "4", "--force")[0] == 0
    assert out.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "vim.config.json", "vim.safetensors"]


def test_list_shows_targets_sources_mappings(capsys):
    code, out, _ = _run(capsys, "list", "--json")
    assert code == 0
    data = json.loads(out)
    vim_t = next(t for t in data["targets"] if t["name"] == "vim-t")
    assert vim_t["params"] == 7_148_008  # hustvl/Vim vim_tiny (Vim-T, 1000 classes)
    assert {m["name"] for m in data["mappings"]} >= {"vit-vim-mlp", "vit-vim-attn"}
    assert any(s["name"] == "deit-s" and s["params"] == 22_050_664 for s in data["sources"])
    assert {op["name"] for op in data["ops"]} >= {"select", "split_qkv", "move_token", "resample_grid"}


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one clear line naming what and where, exit 1, no file written


def _expect_error(capsys, folder: Path, *args: str, match: str) -> str:
    before = _listing(folder)
    code, _, err = _run(capsys, *args)
    assert code == 1, err
    assert err.startswith("error:") and match in err, err
    assert _listing(folder) == before
    return err


def test_unknown_target_and_non_target(tmp_path, src, capsys):
    out = str(tmp_path / "o.safetensors")
    _expect_error(capsys, tmp_path, str(src), "--to", "vim-zz", "--out", out, match="unknown model 'vim-zz'")
    _expect_error(capsys, tmp_path, str(src), "--to", "deit-s", "--out", out, match="not a conversion target")


def test_layers_must_be_positive(tmp_path, src, capsys):
    out = str(tmp_path / "o.safetensors")
    _expect_error(capsys, tmp_path, str(src), "--to", TARGET, "--out", out, "--layers", "0", match="--layers")


def test_source_the_mapping_does_not_accept(tmp_path, capsys):
    """A mapping's `requires` refuses sources it was not written for, naming the file, line and field."""
    strict = tmp_path / "no-layerscale.yaml"
    text = MLP_MAPPING.read_text()
    strict.write_text(text.replace("options:\n", "requires:\n  source: {layer_scale: false}\noptions:\n", 1))
    cfg = dataclasses.replace(SMALL, layer_scale=True)
    src = write_checkpoint(make_vit_state_dict(cfg), tmp_path / "deit3.safetensors")
    out = str(tmp_path / "o.safetensors")
    args = (str(src), "--to", TARGET, "--mapping", str(strict), "--out", out)
    err = _expect_error(capsys, tmp_path, *args, match="accepts only sources with layer_scale = False")
    assert "no-layerscale.yaml:" in err and "requires.source.layer_scale" in err


def test_student_wider_than_teacher_is_refused(tmp_path, src, capsys, monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    register("vim-test-wide", VimConfig(embed_dim=64, depth=2))
    _expect_error(
        capsys,
        tmp_path,
        str(src),
        "--to",
        "vim-test-wide",
        "--out",
        str(tmp_path / "o.safetensors"),
        match="index_sets.residual: keeps 64 (target.embed_dim) of 32",
    )


def test_mapping_that_does_not_cover_the_target(tmp_path, src, capsys):
    text = MLP_MAPPING.read_text()
    start = text.index("  norm_f.weight:")
    end = text.index("  head.weight:")
    broken = tmp_path / "no-norm.yaml"
    broken.write_text(text[:start] + text[end:])
    _expect_error(
        capsys,
        tmp_path,
        str(src),
        "--to",
        TARGET,
        "--mapping",
        str(broken),
        "--out",
        str(tmp_path / "o.safetensors"),
        match="no rule produces norm_f.weight",
    )


def test_shape_mismatch_in_a_mapping(tmp_path, src, capsys):
    text = MLP_MAPPING.read_text().replace(
        "      - select: {dim: 1, set: residual}\n      - scale: {sqrt_ratio: residual}\n    when:",
        "      - transpose: [0, 1]\n    when:",
    )
    broken = tmp_path / "bad-head.yaml"
    broken.write_text(text)
    err = _expect_error(
        capsys,
        tmp_path,
        str(src),
        "--to",
        TARGET,
        "--mapping",
        str(broken),
        "--out",
        str(tmp_path / "o.safetensors"),
        match="produces (32, 10) but target head.weight is (10, 16)",
    )
    assert f"{broken}:" in err and "tensors.head.weight" in err


def test_output_folder_missing_or_read_only(tmp_path, src, capsys):
    _expect_error(
        capsys,
        tmp_path,
        str(src),
        "--to",
        TARGET,
        "--out",
        str(tmp_path / "nope" / "o.safetensors"),
        match="does not exist",
    )
    # /proc refuses new files even for root (a chmod-ed folder would not stop root)
    _expect_error(
        capsys,
        tmp_path,
        str(src),
        "--to",
        TARGET,
        "--out",
        "/proc/tmconvert-test.safetensors",
        match="/proc/tmconvert-test.safetensors: cannot write",
    )
    if os.geteuid() != 0:
        read_only = tmp_path / "ro"
        read_only.mkdir(mode=0o555)
        _expect_error(
            capsys, read_only, str(src), "--to", TARGET, "--out", str(read_only / "o.safetensors"), match="not writable"
        )


def test_bad_options(tmp_path, src, capsys):
    out = str(tmp_path / "o.safetensors")
    _expect_error(capsys, tmp_path, str(src), "--to", TARGET, "--out", out, "--dtype", "fp8", match="--dtype fp8")
    _expect_error(
        capsys,
        tmp_path,
        str(src),
        "--to",
        TARGET,
        "--out",
        out,
        "--score",
        "activation",
        match="needs calibration images",
    )
    _expect_error(
        capsys,
        tmp_path,
        str(src),
        "--to",
        TARGET,
        "--out",
        out,
        "--calib",
        str(tmp_path / "none"),
        match="none: no such data folder",
    )
    _expect_error(
        capsys, tmp_path, str(src), "--to", TARGET, "--out", out, "--mapping", "nope", match="unknown mapping 'nope'"
    )
    _expect_error(capsys, tmp_path, str(tmp_path / "missing.pth"), "--to", TARGET, "--out", out, match="missing.pth")
