"""Any model file as a runnable classifier: a teacher checkpoint (through the checkpoint readers) or a model file
tmconvert wrote (through `load_converted`), decided by the file's own metadata. What `eval`, `verify` and `distill`
load.

A model file is checked as it is read (`load_converted`): a damaged or hand-edited one is a one-line `OutputError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tmconvert.converter.checkpoint import CheckpointError, open_checkpoint
from tmconvert.converter.modelfile.converted import is_model_file, load_converted, read_metadata
from tmconvert.converter.modelfile.errors import MetadataError, OutputError
from tmconvert.models import build_model, family_of


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
    except MetadataError:
        raise
    except OutputError:  # not readable as safetensors: the checkpoint reader that opens it next says why
        return {}


def load_teacher(path: Path, *, num_heads: int | None = None, ema: bool = False) -> LoadedModel:
    """A ViT checkpoint in any format the readers accept, as a float32 `VisionTransformer`."""
    with open_checkpoint(path, ema=ema, num_heads=num_heads) as ckpt:
        model = ckpt.model()
        return LoadedModel(model, "vit", ckpt.config, file_metadata(path), path, tuple(ckpt.files))


def load_model_file(path: Path) -> LoadedModel:
    """A model file written by tmconvert (converted or distilled), as a float32 model of its family (integer buffers,
    stored as floats, in the model's own dtype)."""
    cfg, state, metadata = load_converted(path)
    model = build_model(cfg, device="meta")
    own = model.state_dict()
    as_model = {k: v.to(own[k].dtype if not own[k].is_floating_point() else torch.float32) for k, v in state.items()}
    model.load_state_dict(as_model, strict=True, assign=True)
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
