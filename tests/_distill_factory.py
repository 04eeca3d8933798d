"""Tiny teachers, students, images and recipes for the distillation and evaluation tests.

TEACHER: a timm-initialised ViT, D=32, depth 2, 16x16 images, patch 4 (4x4 grid + cls), 10 classes. STUDENT_CFG: a
ViM with D=16 (E=32), depth 2, d_state 4, converted from the teacher by the real converter (so its metadata carries
the layer plan and index sets a converted file has).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from tmconvert.converter.distill.recipe import LoadedRecipe, load_recipe
from tmconvert.converter.distill.run import DistillRequest
from tmconvert.models import registry as registry_module
from tmconvert.models.vim import VimConfig
from tmconvert.models.vit import VisionTransformer, ViTConfig

TEACHER = ViTConfig(embed_dim=32, depth=2, num_heads=2, mlp_hidden=64, patch_size=4, img_size=(16, 16), num_classes=10)
STUDENT_NAME = "vim-test-distill"
STUDENT_CFG = VimConfig(embed_dim=16, depth=2, d_state=4)

# A minimal recipe file: the schema defaults, with what tests always want (no worker processes, log every step).
TEST_RECIPE = "recipe: 1\ndata:\n  workers: 0\nrun:\n  log_every: 1\n"


@contextlib.contextmanager
def registered(**configs: Any) -> Iterator[None]:
    """`configs` in the model registry under their keyword names, for the duration of the block."""
    saved = dict(registry_module._REGISTRY)
    for name, cfg in configs.items():
        registry_module.register(name, cfg)
    try:
        yield
    finally:
        registry_module._REGISTRY.clear()
        registry_module._REGISTRY.update(saved)


@contextlib.contextmanager
def registered_student() -> Iterator[str]:
    """The tiny student's name in the model registry, for the duration of the block."""
    with registered(**{STUDENT_NAME: STUDENT_CFG}):
        yield STUDENT_NAME


def write_teacher(path: Path, cfg: ViTConfig = TEACHER, seed: int = 0, metadata: dict[str, str] | None = None) -> Path:
    model = VisionTransformer(cfg, seed=seed)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=metadata)
    return path


def convert_student(teacher: Path, out: Path) -> Path:
    from tmconvert.converter.convert.engine import ConvertRequest, convert

    with registered_student() as name:
        convert(ConvertRequest(source=teacher, target=name, out=out, num_heads=TEACHER.num_heads))
    return out


def write_image_folder(root: Path, counts: dict[str, int], size: int = 16, seed: int = 0) -> Path:
    """`root/<class>/<i>.png` random RGB images; `counts` maps class name -> number of images ('' = flat)."""
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        folder = root / name if name else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def recipe(tmp: Path, overrides: list[str] | tuple[str, ...] = (), **flags: Any) -> LoadedRecipe:
    path = tmp / "recipe.yaml"
    if not path.exists():
        path.write_text(TEST_RECIPE)
    return load_recipe(str(path), list(overrides), flags)


def request(
    teacher: Path, student: str | Path, data: str, out: Path, loaded: LoadedRecipe, **kw: Any
) -> DistillRequest:
    return DistillRequest(
        teacher=teacher, student=str(student), data=data, out=out, recipe=loaded, num_heads=TEACHER.num_heads, **kw
    )


def state_of(path: Path) -> dict[str, torch.Tensor]:
    from tmconvert.converter.modelfile.converted import load_converted

    return load_converted(path)[1]
