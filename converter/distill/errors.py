"""Errors of distillation."""

from __future__ import annotations

from tmconvert.converter.errors import TmconvertError


class RecipeError(TmconvertError):
    """A distillation recipe (YAML file or command-line override) is invalid."""


class RunError(TmconvertError):
    """A distillation run cannot start or continue: inputs that do not fit, a run folder in use, a foreign resume."""
