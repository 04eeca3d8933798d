"""The one reader every command uses: any supported ViT checkpoint → canonical timm tensors + a detected `ViTConfig`.

`open_checkpoint` finds the weights (formats.py), unwraps the training container (containers.py), maps the names to
timm's (naming.py) and detects the config from shapes (detect.py). Tensor data is read only by `get`, one tensor at a
time, so looking at or converting a large checkpoint never holds two copies of it. Canonical names follow timm:
fused `blocks.{i}.attn.qkv.*` (Hugging Face query/key/value are concatenated on `get`), `blocks.{i}.ls1.gamma`,
`patch_embed.proj.weight` as (D, C, p, p) even when stored as timm's old 2-D linear patchify.

    with open_checkpoint("deit_small_patch16_224.pth") as ckpt:
        print(ckpt.config, ckpt.num_params)
        qkv = ckpt.get("blocks.0.attn.qkv.weight")
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tmconvert.converter.checkpoint.containers import strip_wrapper_prefixes
from tmconvert.converter.checkpoint.detect import Detection, detect_vit_config, read_config_hints
from tmconvert.converter.checkpoint.errors import CheckpointError
from tmconvert.converter.checkpoint.formats import TensorStore, Weights, open_weights
from tmconvert.converter.checkpoint.naming import NameMap, map_names
from tmconvert.models import VisionTransformer, ViTConfig, state_dict_shapes

__all__ = ["Checkpoint", "TensorInfo", "open_checkpoint"]


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's metadata, known without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class _CanonicalTensor:
    """How one canonical tensor is made: stored tensors concatenated along dim 0, then viewed as `shape`."""

    sources: tuple[str, ...]
    info: TensorInfo


class Checkpoint:
    """An opened checkpoint: canonical timm names, lazy tensors, the detected config. Use as a context manager."""

    path: Path
    format: str  # 'safetensors' | 'safetensors-sharded' | 'torch-zip' | 'torch-legacy' | 'torch-sharded' | 'hf-dir'
    weights_format: str  # format of the weight files themselves (for 'hf-dir': which of the above it holds)
    container: str  # 'flat' | 'model' | 'state_dict' | 'module' | 'model_ema' | 'state_dict_ema'
    container_entries: tuple[str, ...]  # top-level entries of a wrapped torch checkpoint ('model', 'args', ...)
    naming: str  # 'timm' | 'hf-legacy' | 'hf-v5' | 'openai-clip' | 'hf-clip'
    family: str  # 'vit'
    layout: str  # 'vit' | 'vit-avgpool' | 'deit-distilled' | 'deit3' | 'dinov2' | 'dinov2-reg' | 'clip'
    config: ViTConfig
    notes: tuple[str, ...]  # assumptions detection had to make (heads from head_dim 64, square grid, ...)
    ignored: tuple[TensorInfo, ...]  # stored tensors outside the canonical set (HF pooler, mask_token), stored names
    # (a whole other model in the file, CLIP's text tower, is not listed here but summed up in `notes`)
    files: tuple[Path, ...]  # the weight files read
    config_file: Path | None  # the config.json used for detection, if any
    size_on_disk: int  # bytes of the weight files

    def __init__(
        self,
        path: Path,
        weights: Weights,
        names: NameMap,
        tensors: dict[str, _CanonicalTensor],
        detection: Detection,
        config_file: Path | None,
    ):
        self.path = path
        self.format = weights.format
        self.weights_format = weights.weights_format
        self.container = weights.container
        self.container_entries = weights.container_entries
        self.naming = names.naming
        self.family = "vit"
        self.layout = detection.layout
        self.config = config = detection.config
        self.notes = names.notes + detection.notes
        self.ignored = tuple(_stored_info(weights.store, name) for name in sorted(names.ignored))
        self.files = weights.store.files
        self.config_file = config_file
        self.size_on_disk = sum(file.stat().st_size for file in self.files)
        self._store: TensorStore | None = weights.store
        self._tensors = {name: tensors[name] for name in state_dict_shapes(config) if name in tensors}

    def names(self) -> list[str]:
        """Canonical timm names in timm's state_dict order (tokens, embeddings, blocks.0 … blocks.N, norm, heads)."""
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        return self._tensor(name).info

    def source_names(self, name: str) -> tuple[str, ...]:
        """The stored name(s) a canonical tensor is read from (three for fused Hugging Face q/k/v)."""
        return self._tensor(name).sources

    def get(self, name: str) -> torch.Tensor:
        """Read one canonical tensor from disk.

        Tensors of zip-format torch files are memory-mapped views (no copy); treat them as read-only, and clone
        before modifying in place, or later `get`s of the same tensor in this process see the change.
        """
        tensor = self._tensor(name)
        if self._store is None:
            raise ValueError(f"{self.path}: checkpoint is closed")
        parts = [self._store.get(source) for source in tensor.sources]
        fused = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if not bool(torch.isfinite(fused).all()):  # a NaN teacher converts into a NaN student, silently
            raise CheckpointError(f"{self.path}: tensor '{name}' holds non-finite values (NaN or inf)")
        return fused.reshape(tensor.info.shape)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs, each read when the iteration reaches it."""
        for name in self._tensors:
            yield name, self.get(name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All canonical tensors at once, e.g. for `model.load_state_dict` (reads every tensor)."""
        return dict(self.items())

    def model(self) -> VisionTransformer:
        """The checkpoint's weights in a float32 `VisionTransformer` (every tensor is read)."""
        model = VisionTransformer(self.config, device="meta")
        try:
            model.load_state_dict({name: tensor.float() for name, tensor in self.items()}, strict=True, assign=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{self.path}: does not load into a ViT ({str(exc).splitlines()[0]})") from None
        return model

    @property
    def num_params(self) -> int:
        return sum(tensor.info.numel for tensor in self._tensors.values())

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __repr__(self) -> str:
        return (
            f"Checkpoint({str(self.path)!r}, format={self.format!r}, container={self.container!r}, "
            f"naming={self.naming!r}, layout={self.layout!r}, tensors={len(self)}, params={self.num_params})"
        )

    def _tensor(self, name: str) -> _CanonicalTensor:
        tensor = self._tensors.get(name)
        if tensor is None:
            raise CheckpointError(
                f"{self.path}: no tensor '{name}' (canonical timm names, e.g. {', '.join(list(self._tensors)[:3])})"
            )
        return tensor


def open_checkpoint(path: str | Path, *, ema: bool = False, num_heads: int | None = None) -> Checkpoint:
    """Open a ViT checkpoint file or model folder; `ema` reads EMA weights, `num_heads` overrides detection."""
    path = Path(path)
    weights = open_weights(path, ema=ema)
    try:
        stored = strip_wrapper_prefixes(weights.store.keys(), path=path)
        if not stored:
            raise CheckpointError(f"{path}: empty state dict (no tensors)")
        names = map_names(stored, path=path)
        infos = {name: _fused_info(weights.store, name, sources, path) for name, sources in names.sources.items()}
        for name, info in infos.items():
            if not info.dtype.is_floating_point:
                raise CheckpointError(f"{path}: tensor '{name}' is {info.dtype}; a ViT's weights are floating point")
        hints = read_config_hints(weights.config_file) if weights.config_file is not None else None
        detection = detect_vit_config(
            {name: info.shape for name, info in infos.items()},
            naming=names.naming,
            hints=hints,
            num_heads=num_heads,
            path=path,
        )
        # Detection checked that each stored shape is a view of the model's (`stored_as`): read it in the model's.
        canonical = state_dict_shapes(detection.config)
        tensors = {
            name: _CanonicalTensor(names.sources[name], _with_shape(info, canonical[name]))
            for name, info in infos.items()
        }
        return Checkpoint(path, weights, names, tensors, detection, hints.file if hints else None)
    except BaseException:
        weights.store.close()
        raise


def _stored_info(store: TensorStore, name: str) -> TensorInfo:
    shape, dtype = store.shape(name), store.dtype(name)
    return TensorInfo(name, shape, dtype, math.prod(shape) * dtype.itemsize)


def _fused_info(store: TensorStore, name: str, sources: tuple[str, ...], path: Path) -> TensorInfo:
    """Metadata of the canonical tensor made by concatenating `sources` along dim 0."""
    parts = [_stored_info(store, source) for source in sources]
    first = parts[0]
    for part in parts[1:]:
        if part.dtype != first.dtype or part.shape[1:] != first.shape[1:] or not part.shape:
            raise CheckpointError(
                f"{path}: cannot fuse {', '.join(sources)} into '{name}': shapes/dtypes "
                f"{[(p.shape, str(p.dtype)) for p in parts]} differ"
            )
    shape = (sum(p.shape[0] for p in parts), *first.shape[1:]) if len(parts) > 1 else first.shape
    return TensorInfo(name, shape, first.dtype, math.prod(shape) * first.dtype.itemsize)


def _with_shape(info: TensorInfo, shape: tuple[int, ...]) -> TensorInfo:
    return TensorInfo(info.name, shape, info.dtype, info.nbytes)
