"""Reading checkpoints, planning and applying conversions, distillation, and the CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tmconvert")
except PackageNotFoundError:  # running from a checkout without an install
    __version__ = "0.0.0+local"
