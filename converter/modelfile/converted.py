"""The converted-model file: what `tmconvert` writes for a converted or distilled model, and reading it back.

A model file is `<stem>.safetensors` (the weights, in the model's key names) whose header metadata records what
made it (`format: tmconvert`, the tool version, the family, the target name and config; a conversion adds the
mapping, the source, the options, the layer plan and the chosen index sets; a distillation adds its run), so
`load_converted` rebuilds the model without flags, checking the stored config field by field and every tensor's shape
and dtype against it first. Metadata values are strings, structured ones compact JSON with sorted keys; nothing
time- or host-dependent goes in, so the same inputs give a byte-identical file. Every tensor is stored as a float:
a model's integer buffers (BatchNorm's `num_batches_tracked`) are stored as floats and cast back to the model's dtype
when loaded. Beside it, `<stem>.config.json` (the sidecar) carries the same metadata for people and other tools, and
`--format upstream` adds `<stem>.pth` holding the state dict in the container the family's upstream code loads
(the container its config names), the model's own dtypes restored. All files of one model are written
atomically together (`files.atomic_files`): the weights appear last, nothing appears if anything fails, and a commit
cut short by a signal or a crash is undone (by the process, or by the next write of the same file).

The converter's engine and the distillation trainer both write through `write_model_file`; verification, `eval`
and `distill` read through `load_converted`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import safe_open

from tmconvert.converter import __version__
from tmconvert.converter.configs import config_from_json, config_json
from tmconvert.converter.errors import ConfigError
from tmconvert.converter.modelfile.errors import MetadataError, OutputError
from tmconvert.converter.modelfile.files import atomic_files
from tmconvert.converter.modelfile.safetensors import TensorSpec, write_safetensors_stream
from tmconvert.models import ModelConfigError, config_type, family_of, state_dict_shapes

FORMAT = "tmconvert"


def upstream_container(family: str) -> str:
    """The key a family's upstream `.pth` holds its state dict under (`--format upstream`): its config class says
    (`upstream_container`); ConfigError when it does not."""
    container = getattr(config_type(family), "upstream_container", None)
    if container is None:
        raise ConfigError(f"--format upstream: no upstream checkpoint layout is known for {family}")
    return container


@dataclass(frozen=True)
class OutputPaths:
    """The files one conversion writes: the weights, the sidecar config, and the upstream `.pth` if asked (its state
    dict under `container`)."""

    weights: Path
    sidecar: Path
    pth: Path | None
    container: str = "model"

    @classmethod
    def for_weights(cls, weights: Path, *, pth_container: str | None = None) -> OutputPaths:
        stem = weights.name.removesuffix(".safetensors")
        pth = weights.with_name(f"{stem}.pth") if pth_container is not None else None
        return cls(weights, weights.with_name(f"{stem}.config.json"), pth, pth_container or "model")

    def all(self) -> list[Path]:
        return [p for p in (self.weights, self.sidecar, self.pth) if p is not None]


def header_fields(target: str, config: Any) -> dict[str, Any]:
    """The entries every model file starts with: format, tool version, family, target name and config."""
    return {
        "format": FORMAT,
        "tmconvert_version": __version__,
        "family": family_of(config),
        "target": target,
        "target_config": config_json(config),
    }


def encode_metadata(values: dict[str, Any]) -> dict[str, str]:
    """Metadata as safetensors stores it (str -> str): strings as they are, anything else compact sorted JSON.

    The order of `values` is kept: it is the order of the header's bytes."""
    return {key: value if isinstance(value, str) else _dump(value) for key, value in values.items()}


def sidecar_json(metadata: dict[str, str]) -> dict[str, Any]:
    """The sidecar's content: the metadata with JSON objects and lists decoded."""
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        try:
            out[key] = json.loads(value) if value[:1] in "{[" else value
        except json.JSONDecodeError:
            out[key] = value
    return out


def write_model_file(
    paths: OutputPaths,
    specs: Sequence[TensorSpec],
    tensors: Iterator[tuple[str, torch.Tensor]],
    metadata: dict[str, str],
    *,
    overwrite: bool,
    pth_order: Sequence[str] = (),
    pth_dtypes: Mapping[str, torch.dtype] | None = None,
    on_tensor: Callable[[str, int], None] | None = None,
) -> int:
    """Write a model's files atomically: the safetensors streamed from `tensors` (in `specs` order), the sidecar, and
    the `.pth` (keys in `pth_order`, cast to `pth_dtypes` where given: the model's integer buffers) when `paths.pth`
    is set. Returns the bytes of weights written."""
    kept: dict[str, torch.Tensor] = {}
    if paths.pth is not None:
        tensors = _tee(tensors, kept)
    with atomic_files(paths.all(), overwrite=overwrite) as files:
        weights = files[paths.weights].file
        written = write_safetensors_stream(weights, list(specs), tensors, metadata, on_tensor=on_tensor)
        _write_json(files[paths.sidecar].file, sidecar_json(metadata))
        if paths.pth is not None:
            casts = pth_dtypes or {}
            state = {name: kept[name].to(casts.get(name, kept[name].dtype)) for name in pth_order}
            torch.save({paths.container: state}, files[paths.pth].file)
    return written


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The safetensors metadata of a converted file, JSON values decoded."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise OutputError(f"{path}: not a readable safetensors file ({exc})") from None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except RecursionError:  # deeper than Python's JSON decoder goes
            raise MetadataError(f"{path}: unreadable metadata: JSON nested too deeply") from None
        except json.JSONDecodeError:
            out[key] = value
    return out


def is_model_file(metadata: dict[str, Any]) -> bool:
    """Whether a file's metadata (`read_metadata`) says tmconvert wrote it."""
    return metadata.get("format") == FORMAT


def load_converted(path: str | Path) -> tuple[Any, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, state_dict in model order, metadata) of a file `tmconvert` wrote; the config comes from the file."""
    path = Path(path)
    metadata = read_metadata(path)
    if "target_config" not in metadata:
        raise OutputError(f"{path}: no tmconvert metadata (target_config); was it written by tmconvert?")
    _check_target_config(path, metadata)
    try:
        cfg = config_from_json(metadata.get("family", "vim"), metadata["target_config"])
    except ModelConfigError as exc:
        raise OutputError(f"{path}: its target_config does not describe a model: {exc}") from None
    shapes = state_dict_shapes(cfg)
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        if keys != set(shapes):
            missing, extra = sorted(set(shapes) - keys), sorted(keys - set(shapes))
            raise OutputError(f"{path}: keys do not match the target config (missing {missing[:3]}, extra {extra[:3]})")
        state = {name: handle.get_tensor(name) for name in shapes}
    for name, expected in shapes.items():
        tensor = state[name]
        if tuple(tensor.shape) != expected:
            raise OutputError(
                f"{path}: tensor '{name}' has shape {tuple(tensor.shape)}; its target_config gives {expected}"
            )
        if not tensor.dtype.is_floating_point:
            raise OutputError(f"{path}: tensor '{name}' is {tensor.dtype}; model weights are floating point")
    return cfg, state, metadata


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _write_json(handle: IO[bytes], payload: dict[str, Any]) -> None:
    """Indented, sorted JSON with lists of numbers kept on one line (index sets stay readable)."""
    text = json.dumps(payload, indent=2, sort_keys=True)
    text = re.sub(r"\[\s*(-?\d+(?:\s*,\s*-?\d+)*)\s*\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
    handle.write((text + "\n").encode())


def _tee(
    stream: Iterator[tuple[str, torch.Tensor]], keep: dict[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in stream:
        keep[name] = tensor.clone()
        yield name, tensor


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
    if typing.get_origin(hint) is tuple and args[-1:] == (Ellipsis,):  # tuple[int, ...] (PlainMamba's dwconv_layers)
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
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
    if typing.get_origin(hint) is tuple and typing.get_args(hint)[-1:] == (Ellipsis,):
        return f"[{_describe(typing.get_args(hint)[0])}, ...]"
    if typing.get_origin(hint) is tuple:
        return f"[{', '.join(_describe(arg) for arg in typing.get_args(hint))}]"
    names = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", type(None): "null"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))
