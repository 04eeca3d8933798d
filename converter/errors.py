"""The converter's root error type, and the one for options that cannot be used.

Every error a user can cause (bad file, bad YAML, bad option) is a `TmconvertError`; each sub-package defines its
own subclasses next to its code (`CheckpointError` in `checkpoint`, `MappingError` in `mapping`, ...). The CLI turns
them into one line on stderr and exit code 1. Programming errors stay ordinary exceptions and show a traceback.
"""

from __future__ import annotations


class TmconvertError(Exception):
    """Base class: a problem with the user's input, reported as one line."""


class ConfigError(TmconvertError):
    """An option or combination of options that cannot be used (an unknown format, a bad --layers, ...)."""
