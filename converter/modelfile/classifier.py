"""Any model file as a runnable classifier: a teacher checkpoint (through the checkpoint readers) or a model file
tmconvert wrote (through `load_converted`), decided by the file's own metadata. What `eval`, `verify` and `distill`
load.

A model file is input like any other: its target_config is checked field by field against the family's config class
before anything is built from it, and its tensors against the shapes and dtypes that config gives, so a damaged or
hand-edited file is a one-line `OutputError` naming the file and the field or tensor, not a traceback.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tmconvert.converter.checkpoint import CheckpointError, open_checkpoint
from tmconvert.converter.modelfile.converted import is_model_file, load_converted, read_metadata
from tmconvert.converter.modelfile.errors import OutputError
from tmconvert.models import ModelConfigError, build_model, config_type, family_of


@dataclass
class LoadedModel:
    """A runnable classifier with where it came from."""

    model: nn.Module
    family: str  # "vit", "vim", ...
    config: Any  # the family's config
    metadata: dict[str, Any]
    path: Path
    files: tuple[Path, ...]  # the weight files read (what a fingerprint hashes)


def file_metadata(path: Path) -> dict[str, Any]:
    """The safetensors metadata of a single `.safetensors` file (JSON values decoded); {} for anything else."""
    if not (path.is_file() and path.suffix == ".safetensors"):
        return {}
    try:
        return read_metadata(path)
    except OutputError:  # not readable as safetensors: the checkpoint reader that opens it next says why
        return {}
    except RecursionError:  # a metadata value nested deeper than Python's JSON decoder goes
        raise OutputError(f"{path}: unreadable metadata: JSON nested too deeply") from None


def load_teacher(path: Path, *, num_heads: int | None = None, ema: bool = False) -> LoadedModel:
    """A ViT checkpoint in any format the readers accept, as a float32 `VisionTransformer`."""
    with open_checkpoint(path, ema=ema, num_heads=num_heads) as ckpt:
        model = ckpt.model()
        return LoadedModel(model, "vit", ckpt.config, file_metadata(path), path, tuple(ckpt.files))


def load_model_file(path: Path) -> LoadedModel:
    """A model file written by tmconvert (converted or distilled), as a float32 model of its family."""
    _check_target_config(path, file_metadata(path))
    cfg, state, metadata = load_converted(path)
    model = build_model(cfg, device="meta")
    for name, expected in model.state_dict().items():
        tensor = state[name]
        if tensor.shape != expected.shape:
            raise OutputError(
                f"{path}: tensor '{name}' has shape {tuple(tensor.shape)}; its target_config gives "
                f"{tuple(expected.shape)}"
            )
        if not tensor.dtype.is_floating_point:
            raise OutputError(f"{path}: tensor '{name}' is {tensor.dtype}; model weights are floating point")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return LoadedModel(model, family_of(cfg), cfg, metadata, path, (path,))


def non_finite_tensors(model: nn.Module) -> str | None:
    """Which of the model's tensors hold NaN or inf ("tensor 'x' (and 2 more)"); None when all are finite."""
    names = [name for name, tensor in model.state_dict().items() if not bool(torch.isfinite(tensor).all())]
    if not names:
        return None
    return f"tensor '{names[0]}'" + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


def load_classifier(path: str | Path, *, num_heads: int | None = None, ema: bool = False) -> LoadedModel:
    """Any teacher (ViT readers) or student (tmconvert model file) checkpoint as a model in eval mode; weights that
    are not finite are refused (naming the model and the tensor), as no accuracy or training can come of them."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if is_model_file(file_metadata(path)):
        loaded, error = load_model_file(path), OutputError
    else:
        loaded, error = load_teacher(path, num_heads=num_heads, ema=ema), CheckpointError
    broken = non_finite_tensors(loaded.model)
    if broken is not None:
        raise error(f"{path}: {broken} holds non-finite values (NaN or inf)")
    loaded.model.eval()
    return loaded


def _check_target_config(path: Path, metadata: dict[str, Any]) -> None:
    """Every field of the stored target_config present and of its declared type (floats finite), before the config
    class and the model are built from it; the class's own checks (ranges) follow when it is built."""
    data = metadata.get("target_config")
    if not isinstance(data, dict):
        return  # absent or not an object: `load_converted` says so
    try:
        cls = config_type(metadata.get("family", "vim"))
    except ModelConfigError as exc:
        raise OutputError(f"{path}: its target_config does not describe a model: {exc}") from None
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name not in data:
            raise OutputError(f"{path}: target_config has no '{field.name}' (tmconvert records every field)")
        value, hint = data[field.name], hints[field.name]
        if not _conforms(value, hint):
            raise OutputError(f"{path}: target_config '{field.name}' is {value!r}; expected {_describe(hint)}")


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a JSON value is one of the declared type (tuples are stored as lists)."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType):
        return any(_conforms(value, arg) for arg in args)
    if typing.get_origin(hint) is tuple:
        return isinstance(value, list) and len(value) == len(args) and all(map(_conforms, value, args))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):  # JSON's true is no number
        return False
    if hint is float:
        return isinstance(value, int | float) and math.isfinite(value)
    return isinstance(hint, type) and isinstance(value, hint)


def _describe(hint: Any) -> str:
    if isinstance(hint, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return f"[{', '.join(_describe(arg) for arg in typing.get_args(hint))}]"
    names = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", type(None): "null"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))
