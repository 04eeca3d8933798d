"""Tensor-name table: every naming a ViT checkpoint can use, mapped to timm's canonical names.

Like llama.cpp's tensor-name table: one row per tensor kind, with the name each convention gives it. `{i}` is the
block index, `{p}` the parameter (`weight`/`bias`). Hugging Face splits timm's fused `attn.qkv` into query / key /
value (rows with a `part`): the reader concatenates them back in that order (rows 0:D = Q, D:2D = K, 2D:3D = V).
Hugging Face names are matched after removing the base-model prefix (`vit.` / `deit.`); its classifier heads sit
outside that prefix. The canonical order of the names is the timm model's own (`models.state_dict_shapes`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tmconvert.converter.checkpoint.errors import CheckpointError

NAMINGS = ("timm", "hf-legacy", "hf-v5")


@dataclass(frozen=True)
class NameRow:
    """One tensor kind: its canonical timm name and its name in each other convention ('' = not in that one)."""

    timm: str
    hf_legacy: str = ""
    hf_v5: str = ""
    part: int | None = None  # position in the fused timm tensor (q=0, k=1, v=2) for split names


def _hf(timm: str, name: str, part: int | None = None) -> NameRow:
    """A row whose Hugging Face name is the same in both transformers generations."""
    return NameRow(timm, name, name, part)


NAME_TABLE: tuple[NameRow, ...] = (
    _hf("cls_token", "embeddings.cls_token"),
    _hf("dist_token", "embeddings.distillation_token"),
    _hf("pos_embed", "embeddings.position_embeddings"),
    _hf("patch_embed.proj.{p}", "embeddings.patch_embeddings.projection.{p}"),
    NameRow("blocks.{i}.norm1.{p}", "encoder.layer.{i}.layernorm_before.{p}", "layers.{i}.layernorm_before.{p}"),
    NameRow(
        "blocks.{i}.attn.qkv.{p}",
        "encoder.layer.{i}.attention.attention.query.{p}",
        "layers.{i}.attention.q_proj.{p}",
        part=0,
    ),
    NameRow(
        "blocks.{i}.attn.qkv.{p}",
        "encoder.layer.{i}.attention.attention.key.{p}",
        "layers.{i}.attention.k_proj.{p}",
        part=1,
    ),
    NameRow(
        "blocks.{i}.attn.qkv.{p}",
        "encoder.layer.{i}.attention.attention.value.{p}",
        "layers.{i}.attention.v_proj.{p}",
        part=2,
    ),
    NameRow(
        "blocks.{i}.attn.proj.{p}", "encoder.layer.{i}.attention.output.dense.{p}", "layers.{i}.attention.o_proj.{p}"
    ),
    NameRow("blocks.{i}.ls1.gamma"),
    NameRow("blocks.{i}.norm2.{p}", "encoder.layer.{i}.layernorm_after.{p}", "layers.{i}.layernorm_after.{p}"),
    NameRow("blocks.{i}.mlp.fc1.{p}", "encoder.layer.{i}.intermediate.dense.{p}", "layers.{i}.mlp.fc1.{p}"),
    NameRow("blocks.{i}.mlp.fc2.{p}", "encoder.layer.{i}.output.dense.{p}", "layers.{i}.mlp.fc2.{p}"),
    NameRow("blocks.{i}.ls2.gamma"),
    _hf("norm.{p}", "layernorm.{p}"),
    NameRow("fc_norm.{p}"),  # timm's average-pool layout: norm applied after pooling (no `norm.*` then)
    _hf("head.{p}", "classifier.{p}"),  # ViTForImageClassification, DeiTForImageClassification
    _hf("head.{p}", "cls_classifier.{p}"),  # DeiTForImageClassificationWithTeacher
    _hf("head_dist.{p}", "distillation_classifier.{p}"),
)

# Older timm spellings that timm's checkpoint_filter_fn renames (DeiT-III LayerScale).
TIMM_ALIASES: dict[str, str] = {
    "blocks.{i}.gamma_1": "blocks.{i}.ls1.gamma",
    "blocks.{i}.gamma_2": "blocks.{i}.ls2.gamma",
}

# Tensors that are not part of a timm ViT and do not change its classifier output: kept out of the canonical names
# and reported. timm drops `pre_logits` and DINOv2's `mask_token` the same way; HF's pooler feeds only its own output.
IGNORED: dict[str, tuple[str, ...]] = {
    "timm": ("pre_logits.{*}", "mask_token"),
    "hf-legacy": ("pooler.dense.{p}", "embeddings.mask_token"),
    "hf-v5": ("pooler.dense.{p}", "embeddings.mask_token"),
}

# Tensors that identify each naming (after wrapper prefixes are stripped); checked in this order.
_SIGNATURES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("hf-legacy", re.compile(r"^(vit\.|deit\.)?encoder\.layer\.\d+\.attention\.attention\.query\.weight$")),
    ("hf-v5", re.compile(r"^(vit\.|deit\.)?layers\.\d+\.attention\.q_proj\.weight$")),
    ("timm", re.compile(r"^()blocks\.\d+\.attn\.qkv\.weight$")),
)


@dataclass(frozen=True)
class Layout:
    """How the canonical tensors are made from stored ones."""

    naming: str
    sources: dict[str, tuple[str, ...]]  # canonical name → stored names (several: concatenated along dim 0)
    ignored: tuple[str, ...]  # stored names that are not timm ViT tensors (e.g. HF `pooler.dense.*`)


def canonical_layout(stored: dict[str, str], *, path: Path) -> Layout:
    """Map stored names (given as {name without wrapper prefixes: stored name}) to canonical timm names."""
    naming, base_prefix = detect_naming(stored, path=path)
    rules = _compile(naming)
    ignored_rules = [_pattern(template) for template in IGNORED[naming]]
    parts: dict[str, dict[int | None, str]] = {}
    ignored: list[str] = []
    unknown: list[str] = []
    for name, stored_name in stored.items():
        local = name.removeprefix(base_prefix) if base_prefix else name
        target = _match(rules, local)
        if target is None:
            (ignored if any(rule.match(local) for rule in ignored_rules) else unknown).append(stored_name)
            continue
        canonical, part = target
        slot = parts.setdefault(canonical, {})
        if part in slot:
            raise CheckpointError(f"{path}: tensors '{slot[part]}' and '{stored_name}' both map to '{canonical}'")
        slot[part] = stored_name
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:6]) + (f" and {len(unknown) - 6} more" if len(unknown) > 6 else "")
        raise CheckpointError(
            f"{path}: {len(unknown)} tensor(s) are not part of a ViT/DeiT that tmconvert can represent "
            f"(naming '{naming}'): {shown}"
        )
    sources: dict[str, tuple[str, ...]] = {}
    for canonical, slot in parts.items():
        if None in slot:
            sources[canonical] = (slot[None],)
        elif sorted(slot) == [0, 1, 2]:
            sources[canonical] = (slot[0], slot[1], slot[2])
        else:
            missing = [("query", "key", "value")[i] for i in range(3) if i not in slot]
            raise CheckpointError(f"{path}: '{canonical}' lacks its {' and '.join(missing)} part(s)")
    return Layout(naming, sources, tuple(ignored))


def detect_naming(stored: Iterable[str], *, path: Path) -> tuple[str, str]:
    """The naming convention and the Hugging Face base prefix ('' for timm or a headless `ViTModel`)."""
    names = list(stored)
    for naming, signature in _SIGNATURES:
        for name in names:
            found = signature.match(name)
            if found:
                return naming, found.group(1) or ""
    sample = ", ".join(repr(n) for n in names[:5])
    raise CheckpointError(
        f"{path}: not a ViT/DeiT checkpoint: expected timm 'blocks.N.attn.qkv.weight' or Hugging Face "
        f"'encoder.layer.N.attention.attention.query.weight' / 'layers.N.attention.q_proj.weight' tensors; "
        f"found {len(names)} tensor(s) such as {sample}"
    )


def _compile(naming: str) -> list[tuple[re.Pattern[str], str, int | None]]:
    """(pattern over stored names, canonical template, part) for one naming."""
    if naming == "timm":
        rows = [(_pattern(name), name, None) for name in dict.fromkeys(row.timm for row in NAME_TABLE)]
        rows += [(_pattern(alias), target, None) for alias, target in TIMM_ALIASES.items()]
        return rows
    field = "hf_legacy" if naming == "hf-legacy" else "hf_v5"
    return [(_pattern(getattr(row, field)), row.timm, row.part) for row in NAME_TABLE if getattr(row, field)]


def _match(rules: list[tuple[re.Pattern[str], str, int | None]], name: str) -> tuple[str, int | None] | None:
    for pattern, template, part in rules:
        found = pattern.match(name)
        if found:
            return template.format(**found.groupdict()), part
    return None


def _pattern(template: str) -> re.Pattern[str]:
    """`blocks.{i}.norm1.{p}` → a regex with named groups i and p; `{*}` matches any rest of the name."""
    regex = re.escape(template)
    regex = regex.replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)").replace(r"\{\*\}", r".+")
    return re.compile(f"^{regex}$")
