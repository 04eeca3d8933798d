"""Reading checkpoints: any supported file or folder → canonical timm tensors and a detected `ViTConfig`.

`formats` finds the bytes (safetensors, torch pickles through `safe_unpickle`, shards, Hugging Face folders),
`containers` unwraps training checkpoints, `naming` maps every naming convention to timm's through one table,
`detect` reads the config from shapes, and `reader` puts them together as `open_checkpoint`.
"""

from tmconvert.converter.checkpoint.errors import CheckpointError, UnsafePickleError
from tmconvert.converter.checkpoint.reader import Checkpoint, TensorInfo, open_checkpoint

__all__ = ["Checkpoint", "CheckpointError", "TensorInfo", "UnsafePickleError", "open_checkpoint"]
