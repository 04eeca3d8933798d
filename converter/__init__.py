"""The tmconvert application: one sub-package per stage of the pipeline (docs/architecture.md).

checkpoint (read) → mapping (the language) → plan → convert (apply) → modelfile (write) → verify; distill and data
apart from conversion; lint checks YAML files; cli is the edge.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tmconvert")
except PackageNotFoundError:  # running from a checkout without an install
    __version__ = "0.0.0+local"
