"""Depth: which teacher block (or sub-layer of one) feeds each student layer (TransMamba's "prioritise the first n
layers")."""

from __future__ import annotations

from dataclasses import dataclass

from tmconvert.converter.errors import ConfigError

WHOLE_BLOCK = "block"


@dataclass(frozen=True)
class LayerPlan:
    """Which teacher block feeds each student layer (None: not inherited, initialised by the `rest` rules), and which
    part of it: the whole block, or its `attn` / `mlp` sub-layer when the mapping interleaves."""

    blocks: tuple[int | None, ...]
    requested: int
    warnings: tuple[str, ...] = ()
    sublayers: tuple[str | None, ...] = ()

    def __post_init__(self) -> None:
        if not self.sublayers:
            whole = tuple(WHOLE_BLOCK if b is not None else None for b in self.blocks)
            object.__setattr__(self, "sublayers", whole)

    @property
    def inherited(self) -> int:
        return sum(b is not None for b in self.blocks)

    @property
    def interleaved(self) -> bool:
        return any(part not in (WHOLE_BLOCK, None) for part in self.sublayers)

    @property
    def effective(self) -> int:
        """`--layers` after clamping: teacher blocks used when interleaved, else inherited student layers."""
        return len(self.used_blocks()) if self.interleaved else self.inherited

    def used_blocks(self) -> tuple[int, ...]:
        return tuple(sorted({b for b in self.blocks if b is not None}))

    def describe(self, layer: int) -> str:
        """`block 3`, `block 3 attn`, `block 3 mlp`, or `-` for a layer no teacher block feeds."""
        block, part = self.blocks[layer], self.sublayers[layer]
        if block is None:
            return "-"
        return f"block {block}" if part == WHOLE_BLOCK else f"block {block} {part}"

    def to_json(self) -> list[dict[str, object]]:
        """[{"layer": j, "block": b}] plus "sublayer" ("attn" / "mlp") where a layer takes part of a block; no key
        means the whole block (what every file written before interleaving says)."""
        return [
            {"layer": j, "block": b, **({"sublayer": part} if part not in (WHOLE_BLOCK, None) else {})}
            for j, (b, part) in enumerate(zip(self.blocks, self.sublayers, strict=True))
        ]


def plan_layers(
    requested: int | None, teacher_depth: int, student_depth: int, *, interleaved: bool = False
) -> LayerPlan:
    """`--layers n`: the first n teacher blocks feed the student's first layers, the rest default-initialised.

    Whole blocks: student j <- teacher j for n <= teacher depth; n > teacher depth spreads evenly, student j <-
    teacher floor(j * T / n) (each block feeds n/T consecutive layers). n > student depth is clamped with a warning.
    Default n = min(teacher depth, student depth).

    Interleaved (a mapping with `sublayers`): block i feeds two layers, 2i its attention and 2i+1 its MLP, so n blocks
    fill the first 2n student layers. n is at most the teacher depth and half the student depth (clamped with a
    warning); default n = min(teacher depth, student depth // 2).
    """
    most = min(teacher_depth, student_depth // 2) if interleaved else student_depth
    if requested is None:
        requested = most if interleaved else min(teacher_depth, student_depth)
    if requested <= 0:
        raise ConfigError(f"--layers must be at least 1, got {requested}")
    warnings: list[str] = []
    n = requested
    if n > most:
        if interleaved:
            why = (
                f"the teacher's {teacher_depth} blocks"
                if most == teacher_depth
                else (f"the student's {student_depth} layers (two per block)")
            )
        else:
            why = f"the student's {student_depth} layers"
        warnings.append(f"--layers {n} exceeds {why}; using {most}")
        n = most
    if interleaved:
        blocks = tuple(i for i in range(n) for _ in range(2)) + (None,) * (student_depth - 2 * n)
        parts = ("attn", "mlp") * n + (None,) * (student_depth - 2 * n)
        return LayerPlan(blocks, requested, tuple(warnings), parts)
    feeds = list(range(n)) if n <= teacher_depth else [j * teacher_depth // n for j in range(n)]
    return LayerPlan(tuple(feeds) + (None,) * (student_depth - n), requested, tuple(warnings))
