"""Errors of writing and reading converted-model files."""

from __future__ import annotations

from tmconvert.converter.errors import TmconvertError


class OutputError(TmconvertError):
    """An output path cannot be written (missing folder, read-only, exists without --force), or a file that should
    be a tmconvert model is not one."""


class MetadataError(OutputError):
    """A readable safetensors file whose tmconvert metadata cannot be decoded."""
