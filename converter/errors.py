"""The project's exception types.

Every error a user can cause (bad file, bad YAML, bad option) is a `TmconvertError`; the CLI turns it into one line
on stderr and exit code 1. Programming errors stay ordinary exceptions and show a traceback.
"""

from __future__ import annotations


class TmconvertError(Exception):
    """Base class: a problem with the user's input, reported as one line."""


class CheckpointError(TmconvertError):
    """A checkpoint cannot be read: missing, truncated, corrupted, unsafe or of an unknown family."""


class UnsafePickleError(CheckpointError):
    """A pickle asked for a global outside the allow-list; nothing from it was executed."""


class ConfigError(TmconvertError):
    """An unknown model name, or a configuration that cannot be built."""


class MappingError(TmconvertError):
    """A mapping file is invalid, or does not fit the source and target."""


class OutputError(TmconvertError):
    """An output path cannot be written (missing folder, read-only, exists without --force)."""


class RecipeError(TmconvertError):
    """A distillation recipe (YAML file or command-line override) is invalid."""


class RunError(TmconvertError):
    """A distillation run cannot start or continue: inputs that do not fit, a run folder in use, a foreign resume."""
