"""Hostile YAML given as a mapping or recipe: alias bombs, deep nesting, FIFOs, and where problems are blamed.

Each is refused with one line naming the file (and line) or the option, quickly and in constant memory, through
every command that reads these files: `check`, `convert --mapping`, `distill --recipe`.
"""

from __future__ import annotations

import os
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from tmconvert.converter.cli import main
from tmconvert.converter.distill.errors import RecipeError
from tmconvert.converter.distill.recipe import load_recipe
from tmconvert.converter.mapping.errors import MappingError
from tmconvert.converter.yamlfile import MAX_DEPTH, read_yaml


def _bomb(tmp_path: Path, kind: str) -> Path:
    """A "billion laughs" file: nine levels of nine aliases each, 9**9 (387 million) list items once expanded."""
    lines = [f"{kind}: 1", "a: &a [1,1,1,1,1,1,1,1,1]"]
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [{','.join([f'*{previous}'] * 9)}]")
    path = tmp_path / f"bomb-{kind}.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 400
    return path


def _convert_with(tmp_path: Path, mapping: Path) -> list[str]:
    """`convert --mapping`: the mapping is read before the checkpoint (which does not exist)."""
    return ["convert", str(tmp_path / "teacher.safetensors"), "--to", "vim-t", "--mapping", str(mapping)]


def _distill_with(tmp_path: Path, recipe: Path) -> list[str]:
    """`distill --recipe`: the recipe is read before the teacher (which does not exist)."""
    teacher, out = str(tmp_path / "teacher.safetensors"), str(tmp_path / "run")
    return ["distill", teacher, "vim-t", "--data", "synthetic:8", "--out", out, "--recipe", str(recipe)]


def test_alias_bomb_is_refused_fast_in_constant_memory(tmp_path, capsys):
    mapping, recipe = _bomb(tmp_path, "mapping"), _bomb(tmp_path, "recipe")
    expected = "3: alias *a: YAML aliases are not allowed"
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(MappingError) as exc:
            read_yaml(mapping, MappingError, "mapping")
        elapsed, (_, peak) = time.perf_counter() - started, tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(exc.value) == f"{mapping}:{expected}"
    assert elapsed < 1.0 and peak < 2**20, (elapsed, peak)

    started = time.perf_counter()
    assert main(["check", str(mapping), str(recipe)]) == 1
    out = capsys.readouterr().out
    assert f"  {mapping}:{expected}\n" in out and f"  {recipe}:{expected}\n" in out, out
    for path, argv in ((mapping, _convert_with(tmp_path, mapping)), (recipe, _distill_with(tmp_path, recipe))):
        assert main(argv) == 1
        captured = capsys.readouterr()
        assert captured.err == f"error: {path}:{expected}\n" and captured.out == ""
    assert time.perf_counter() - started < 10.0


def test_anchors_without_aliases_still_load(tmp_path):
    path = tmp_path / "anchored.yaml"
    path.write_text("recipe: 1\nsteps: &n 5\n")
    assert read_yaml(path, RecipeError, "recipe").data == {"recipe": 1, "steps": 5}


def test_deep_nesting_is_refused_not_a_recursion_error(tmp_path, capsys):
    path = tmp_path / "deep.yaml"
    path.write_text("[" * MAX_DEPTH + "]" * MAX_DEPTH + "\n")
    assert read_yaml(path, MappingError, "mapping").lines[(0,) * (MAX_DEPTH - 1)] == 1
    path.write_text("recipe: 1\nsteps:\n  " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(RecipeError) as exc:
        read_yaml(path, RecipeError, "recipe")
    assert str(exc.value) == f"{path}:3: nested deeper than {MAX_DEPTH} levels"
    assert main(["check", str(path)]) == 1
    assert f"  {path}:3: nested deeper than {MAX_DEPTH} levels\n" in capsys.readouterr().out


def _without_blocking(fifo: Path, call: Callable[[], int]) -> int:
    """`call()`, failing the test (instead of hanging it) if it blocks on the FIFO."""
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(10.0)
    if thread.is_alive():
        with open(fifo, "wb"):  # a writer that closes at once: the blocked reader sees end of file and returns
            pass
        thread.join(10.0)
        pytest.fail(f"blocked reading the FIFO {fifo}")
    return result[0]


def test_a_fifo_is_refused_not_read(tmp_path, capsys):
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    assert _without_blocking(fifo, lambda: main(["check", str(fifo)])) == 1
    assert f"  {fifo} is not a regular file\n" in capsys.readouterr().out
    for argv in (_convert_with(tmp_path, fifo), _distill_with(tmp_path, fifo)):
        assert _without_blocking(fifo, lambda argv=argv: main(argv)) == 1
        captured = capsys.readouterr()
        assert captured.err == f"error: {fifo} is not a regular file\n" and captured.out == ""


def test_an_unknown_field_from_set_is_blamed_on_the_set(tmp_path, capsys):
    with pytest.raises(RecipeError) as exc:
        load_recipe(None, ["nosuch.field=1"])
    assert str(exc.value) == "--set nosuch.field=1: nosuch: Extra inputs are not permitted"
    with pytest.raises(RecipeError) as exc:
        load_recipe(None, ["optim.nosuch=1"])
    assert str(exc.value) == "--set optim.nosuch=1: optim.nosuch: Extra inputs are not permitted"
    assert main([*_distill_with(tmp_path, Path("default")), "--set", "nosuch.field=1"]) == 1
    assert capsys.readouterr().err == "error: --set nosuch.field=1: nosuch: Extra inputs are not permitted\n"
