"""Errors of image data."""

from __future__ import annotations

from tmconvert.converter.errors import TmconvertError


class DatasetError(TmconvertError):
    """A dataset file or folder is missing or malformed, or a data option is."""
