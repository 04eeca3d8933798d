"""The built wheel is a complete package: installed outside the checkout, it finds and checks its mappings and
recipes, and every sub-package of the checkout is in it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools.config.pyprojecttoml import read_configuration

ROOT = Path(__file__).resolve().parents[1]
SETUPTOOLS = read_configuration(ROOT / "pyproject.toml")["tool"]["setuptools"]

PROBE = """
import json, sys
import tmconvert.converter, tmconvert.mappings
from tmconvert.converter.cli import main
from tmconvert.converter.distill.recipe import shipped_recipe_paths
from tmconvert.converter.mapping.files import shipped_mapping_paths
print(json.dumps({"package": tmconvert.converter.__file__, "mappings": [str(p) for p in shipped_mapping_paths()],
                  "recipes": [str(p) for p in shipped_recipe_paths().values()]}))
sys.exit(main(["check"]))
"""


def test_wheel_installed_elsewhere_finds_and_checks_its_mappings(tmp_path: Path) -> None:
    # Build from a copy of the package sources: setuptools builds in-tree (build/), which would litter the checkout
    # and could carry stale files into the wheel.
    src = tmp_path / "src"
    for name in ("pyproject.toml", "README.md"):
        src.mkdir(exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    for folder in SETUPTOOLS["package-dir"].values():
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("tmconvert-*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    # -S skips site processing, so the checkout's editable-install hook is not loaded; dependencies come from the
    # venv's site-packages, named explicitly after the installed wheel.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]])}
    run = subprocess.run([sys.executable, "-S", "-c", PROBE], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    import json

    found = json.loads(run.stdout.splitlines()[0])
    assert Path(found["package"]).is_relative_to(site)
    names = sorted(Path(p).name for p in found["mappings"])
    assert "vit-vim-mlp.yaml" in names and "vit-vim-attn.yaml" in names
    assert all(Path(p).is_relative_to(site) for p in found["mappings"])
    assert [Path(p).name for p in found["recipes"]] == ["default.yaml"]
    assert all(Path(p).is_relative_to(site) for p in found["recipes"])


def test_every_package_folder_of_the_checkout_is_packaged() -> None:
    folders = {
        f"tmconvert.{init.parent.relative_to(ROOT)}".replace("/", ".")
        for init in ROOT.glob("*/**/__init__.py")
        if init.parts[len(ROOT.parts)] in SETUPTOOLS["package-dir"].values()
    }
    assert folders == set(SETUPTOOLS["packages"])
