"""The converted-model file: what `tmconvert` writes for a converted or distilled model, and reading it back.

A model file is `<stem>.safetensors` (the weights, in the model's key names) whose header metadata records what
made it (`format: tmconvert`, the tool version, the family, the target name and config; a conversion adds the
mapping, the source, the options, the layer plan and the chosen index sets; a distillation adds its run), so
`load_converted` rebuilds the model without flags. Metadata values are strings, structured ones compact JSON with
sorted keys; nothing time- or host-dependent goes in, so the same inputs give a byte-identical file. Beside it,
`<stem>.config.json` (the sidecar) carries the same metadata for people and other tools, and `--format vim` adds
`<stem>.pth` holding `{'model': state_dict}` for the upstream Vim code. All files of one model are written
atomically together (`files.atomic_files`): the weights appear last, nothing appears if anything fails, and a commit
cut short by a signal or a crash is undone (by the process, or by the next write of the same file).

The converter's engine and the distillation trainer both write through `write_model_file`; verification, `eval`
and `distill` read through `load_converted`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import safe_open

from tmconvert.converter import __version__
from tmconvert.converter.configs import config_from_json, config_json
from tmconvert.converter.modelfile.errors import OutputError
from tmconvert.converter.modelfile.files import atomic_files
from tmconvert.converter.modelfile.safetensors import TensorSpec, write_safetensors_stream
from tmconvert.models import ModelConfigError, family_of, state_dict_shapes

FORMAT = "tmconvert"


@dataclass(frozen=True)
class OutputPaths:
    """The files one conversion writes: the weights, the sidecar config, and the upstream-Vim `.pth` if asked."""

    weights: Path
    sidecar: Path
    pth: Path | None

    @classmethod
    def for_weights(cls, weights: Path, *, vim_pth: bool) -> OutputPaths:
        stem = weights.name.removesuffix(".safetensors")
        pth = weights.with_name(f"{stem}.pth") if vim_pth else None
        return cls(weights, weights.with_name(f"{stem}.config.json"), pth)

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
    on_tensor: Callable[[str, int], None] | None = None,
) -> int:
    """Write a model's files atomically: the safetensors streamed from `tensors` (in `specs` order), the sidecar, and
    the `.pth` (keys in `pth_order`) when `paths.pth` is set. Returns the bytes of weights written."""
    kept: dict[str, torch.Tensor] = {}
    if paths.pth is not None:
        tensors = _tee(tensors, kept)
    with atomic_files(paths.all(), overwrite=overwrite) as files:
        weights = files[paths.weights].file
        written = write_safetensors_stream(weights, list(specs), tensors, metadata, on_tensor=on_tensor)
        _write_json(files[paths.sidecar].file, sidecar_json(metadata))
        if paths.pth is not None:
            torch.save({"model": {name: kept[name] for name in pth_order}}, files[paths.pth].file)
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
    try:
        cfg = config_from_json(metadata.get("family", "vim"), metadata["target_config"])
    except ModelConfigError as exc:
        raise OutputError(f"{path}: its target_config does not describe a model: {exc}") from None
    order = list(state_dict_shapes(cfg))
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        if keys != set(order):
            missing, extra = sorted(set(order) - keys), sorted(keys - set(order))
            raise OutputError(f"{path}: keys do not match the target config (missing {missing[:3]}, extra {extra[:3]})")
        state = {name: handle.get_tensor(name) for name in order}
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
