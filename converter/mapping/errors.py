"""Errors of the mapping language."""

from __future__ import annotations

from tmconvert.converter.errors import TmconvertError


class MappingError(TmconvertError):
    """A mapping file is invalid, or does not fit the source and target."""
