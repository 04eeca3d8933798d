"""Depth: which teacher block (or sub-layer of one) feeds each student layer (TransMamba's "prioritise the first n
layers"), and for a hierarchical student (stages of blocks) how those blocks share out over its stages."""

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
    stages: tuple[int, ...] = ()  # student blocks per stage, for a hierarchical student; () for one stack of layers

    def __post_init__(self) -> None:
        if not self.sublayers:
            whole = tuple(WHOLE_BLOCK if b is not None else None for b in self.blocks)
            object.__setattr__(self, "sublayers", whole)

    def position(self, layer: int) -> tuple[int, int] | None:
        """(stage, block within the stage) of student layer `layer` (numbered over all stages); None: no stages."""
        if not self.stages:
            return None
        start = 0
        for stage, depth in enumerate(self.stages):
            if layer < start + depth:
                return stage, layer - start
            start += depth
        raise IndexError(f"layer {layer} is beyond the student's {start} blocks")

    def layer_at(self, stage: int, index: int) -> int | None:
        """The student layer of block `index` of `stage` (None: no such block)."""
        if not 0 <= stage < len(self.stages) or not 0 <= index < self.stages[stage]:
            return None
        return sum(self.stages[:stage]) + index

    def label(self, layer: int) -> str:
        """How the student names a layer: `3`, or `stage 1 block 0` for a hierarchical student."""
        where = self.position(layer)
        return str(layer) if where is None else f"stage {where[0]} block {where[1]}"

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

    def used_blocks(self, stage: int | None = None) -> tuple[int, ...]:
        """The teacher blocks some student layer inherits (`stage`: some layer of that stage)."""
        layers = (
            range(len(self.blocks))
            if stage is None
            else [j for j in range(len(self.blocks)) if self.position(j)[0] == stage]
        )
        return tuple(sorted({self.blocks[j] for j in layers if self.blocks[j] is not None}))

    def describe(self, layer: int) -> str:
        """`block 3`, `block 3 attn`, `block 3 mlp`, or `-` for a layer no teacher block feeds."""
        block, part = self.blocks[layer], self.sublayers[layer]
        if block is None:
            return "-"
        return f"block {block}" if part == WHOLE_BLOCK else f"block {block} {part}"

    def to_json(self) -> list[dict[str, object]]:
        """[{"layer": j, "block": b}] plus "sublayer" ("attn" / "mlp") where a layer takes part of a block; no key
        means the whole block (what every file written before interleaving says). A hierarchical student's rows
        also say where layer j sits: "stage" s and "stage_block" i (block i of stage s)."""
        rows = []
        for j, (b, part) in enumerate(zip(self.blocks, self.sublayers, strict=True)):
            row: dict[str, object] = {"layer": j, "block": b}
            if part not in (WHOLE_BLOCK, None):
                row["sublayer"] = part
            if (where := self.position(j)) is not None:
                row["stage"], row["stage_block"] = where
            rows.append(row)
        return rows


def split_over_stages(n: int, depths: tuple[int, ...]) -> tuple[int, ...]:
    """How many of n inherited blocks each stage takes: in proportion to the stages' depths, n * d_s / sum(d),
    rounded by largest remainder (ties to the earlier stage); a stage never takes more than its depth."""
    total = sum(depths)
    n = min(n, total)
    counts = [n * d // total for d in depths]
    by_remainder = sorted(range(len(depths)), key=lambda s: (-(n * depths[s] % total), s))
    for s in by_remainder[: n - sum(counts)]:
        counts[s] += 1
    return tuple(counts)


def plan_layers(
    requested: int | None,
    teacher_depth: int,
    student_depth: int,
    *,
    interleaved: bool = False,
    stages: tuple[int, ...] = (),
) -> LayerPlan:
    """`--layers n`: the first n teacher blocks feed the student's first layers, the rest default-initialised.

    Whole blocks: student j <- teacher j for n <= teacher depth; n > teacher depth spreads evenly, student j <-
    teacher floor(j * T / n) (each block feeds n/T consecutive layers). n > student depth is clamped with a warning.
    Default n = min(teacher depth, student depth).

    Stages (a hierarchical student, `stages` = its blocks per stage): the n inherited blocks share out over the
    stages in proportion to their depths (`split_over_stages`), and stage s inherits with its first n_s blocks; the
    student layers so chosen, taken in order (stage by stage), get the teacher blocks as above. So each stage takes
    a contiguous run of teacher blocks, the first stage the first ones, and the last stage feeds the head from the
    last ones: 12 teacher blocks into VMamba-T's 2/2/8/2 give 2/2/7/1, blocks 0-1, 2-3, 4-10 and 11.

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
    if not stages:
        return LayerPlan(tuple(feeds) + (None,) * (student_depth - n), requested, tuple(warnings))
    blocks: list[int | None] = [None] * student_depth
    inheriting = [sum(stages[:s]) + i for s, count in enumerate(split_over_stages(n, stages)) for i in range(count)]
    for layer, block in zip(inheriting, feeds, strict=True):
        blocks[layer] = block
    return LayerPlan(tuple(blocks), requested, tuple(warnings), stages=tuple(stages))
