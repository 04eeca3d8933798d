"""Depth: which teacher block feeds each student layer (TransMamba's "prioritise the first n layers")."""

from __future__ import annotations

from dataclasses import dataclass

from tmconvert.converter.errors import ConfigError


@dataclass(frozen=True)
class LayerPlan:
    """Which teacher block feeds each student layer (None: not inherited, initialised by the `rest` rules)."""

    blocks: tuple[int | None, ...]
    requested: int
    warnings: tuple[str, ...] = ()

    @property
    def inherited(self) -> int:
        return sum(b is not None for b in self.blocks)

    def used_blocks(self) -> tuple[int, ...]:
        return tuple(sorted({b for b in self.blocks if b is not None}))


def plan_layers(requested: int | None, teacher_depth: int, student_depth: int) -> LayerPlan:
    """`--layers n`: student layers 0..n-1 from teacher blocks, the rest default-initialised.

    n <= teacher depth: student j <- teacher j. n > teacher depth: spread evenly, student j <- teacher
    floor(j * T / n) (each block feeds n/T consecutive layers). n > student depth is clamped with a warning.
    Default n = min(teacher depth, student depth).
    """
    if requested is None:
        requested = min(teacher_depth, student_depth)
    if requested <= 0:
        raise ConfigError(f"--layers must be at least 1, got {requested}")
    warnings: list[str] = []
    n = requested
    if n > student_depth:
        warnings.append(f"--layers {n} exceeds the student's {student_depth} layers; using {student_depth}")
        n = student_depth
    feeds = list(range(n)) if n <= teacher_depth else [j * teacher_depth // n for j in range(n)]
    return LayerPlan(tuple(feeds) + (None,) * (student_depth - n), requested, tuple(warnings))
