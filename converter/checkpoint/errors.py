"""Errors of reading checkpoints."""

from __future__ import annotations

from tmconvert.converter.errors import TmconvertError


class CheckpointError(TmconvertError):
    """A checkpoint cannot be read: missing, truncated, corrupted, unsafe or of an unknown family."""


class UnsafePickleError(CheckpointError):
    """A pickle asked for a global outside the allow-list; nothing from it was executed."""
