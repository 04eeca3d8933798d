"""Tensor-name table: every naming a ViT checkpoint can use, mapped to timm's canonical names.

Like llama.cpp's tensor-name table: one row per tensor kind, with the name each convention gives it (one column per
convention, `NAMINGS` says where each one's names sit). `{i}` is the block index, `{p}` the parameter
(`weight`/`bias`). Hugging Face splits timm's fused `attn.qkv` into query / key / value (rows with a `part`): the
reader concatenates them back in that order (rows 0:D = Q, D:2D = K, 2D:3D = V); OpenAI CLIP's `in_proj_weight` is
already fused in that order. A few tensors are stored in another shape than timm's (CLIP's (D,) class embedding,
(T, D) position embedding): the reader views them in the canonical shape, which the detected config fixes. The
canonical order of the names is the timm model's own (`models.state_dict_shapes`).

A naming is recognised by its name for a block's query (or fused qkv) weight. Architectures that are not
plain ViTs are refused by one tensor that only they have (`UNSUPPORTED`), before any naming is tried.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tmconvert.converter.checkpoint.errors import CheckpointError


@dataclass(frozen=True)
class NameRow:
    """One tensor kind: its canonical timm name and its name in each other convention ('' = not in that one)."""

    timm: str
    hf_legacy: str = ""
    hf_v5: str = ""
    openai_clip: str = ""
    hf_clip: str = ""
    part: int | None = None  # position in the fused timm tensor (q=0, k=1, v=2) for split names


def _hf(timm: str, name: str, part: int | None = None, **clip: str) -> NameRow:
    """A row whose Hugging Face name is the same in both transformers generations."""
    return NameRow(timm, name, name, part=part, **clip)


def _qkv(legacy: str, v5: str, clip: str = "") -> tuple[NameRow, ...]:
    """The three rows of a split q/k/v: `{x}` in each name is the part's own word (query/q, ...)."""
    words = (("query", "q"), ("key", "k"), ("value", "v"))
    return tuple(
        NameRow(
            "blocks.{i}.attn.qkv.{p}",
            legacy.replace("{x}", long),
            v5.replace("{x}", short),
            hf_clip=clip.replace("{x}", short),
            part=part,
        )
        for part, (long, short) in enumerate(words)
    )


NAME_TABLE: tuple[NameRow, ...] = (
    _hf("cls_token", "embeddings.cls_token", openai_clip="class_embedding", hf_clip="embeddings.class_embedding"),
    _hf("reg_token", "embeddings.register_tokens"),  # DINOv2 registers (facebookresearch: `register_tokens`)
    _hf("dist_token", "embeddings.distillation_token"),
    _hf(
        "pos_embed",
        "embeddings.position_embeddings",
        openai_clip="positional_embedding",
        hf_clip="embeddings.position_embedding.weight",
    ),
    _hf(
        "patch_embed.proj.{p}",
        "embeddings.patch_embeddings.projection.{p}",
        openai_clip="conv1.{p}",
        hf_clip="embeddings.patch_embedding.{p}",
    ),
    NameRow("norm_pre.{p}", openai_clip="ln_pre.{p}", hf_clip="pre_layrnorm.{p}"),  # sic: transformers' spelling
    # Blocks of ViT / DeiT / CLIP.
    NameRow(
        "blocks.{i}.norm1.{p}",
        "encoder.layer.{i}.layernorm_before.{p}",
        "layers.{i}.layernorm_before.{p}",
        openai_clip="transformer.resblocks.{i}.ln_1.{p}",
        hf_clip="encoder.layers.{i}.layer_norm1.{p}",
    ),
    *_qkv(
        "encoder.layer.{i}.attention.attention.{x}.{p}",
        "layers.{i}.attention.{x}_proj.{p}",
        clip="encoder.layers.{i}.self_attn.{x}_proj.{p}",
    ),
    NameRow("blocks.{i}.attn.qkv.{p}", openai_clip="transformer.resblocks.{i}.attn.in_proj_{p}"),
    NameRow(
        "blocks.{i}.attn.proj.{p}",
        "encoder.layer.{i}.attention.output.dense.{p}",
        "layers.{i}.attention.o_proj.{p}",
        openai_clip="transformer.resblocks.{i}.attn.out_proj.{p}",
        hf_clip="encoder.layers.{i}.self_attn.out_proj.{p}",
    ),
    NameRow("blocks.{i}.ls1.gamma"),
    NameRow(
        "blocks.{i}.norm2.{p}",
        "encoder.layer.{i}.layernorm_after.{p}",
        "layers.{i}.layernorm_after.{p}",
        openai_clip="transformer.resblocks.{i}.ln_2.{p}",
        hf_clip="encoder.layers.{i}.layer_norm2.{p}",
    ),
    NameRow(
        "blocks.{i}.mlp.fc1.{p}",
        "encoder.layer.{i}.intermediate.dense.{p}",
        "layers.{i}.mlp.fc1.{p}",
        openai_clip="transformer.resblocks.{i}.mlp.c_fc.{p}",
        hf_clip="encoder.layers.{i}.mlp.fc1.{p}",
    ),
    NameRow(
        "blocks.{i}.mlp.fc2.{p}",
        "encoder.layer.{i}.output.dense.{p}",
        "layers.{i}.mlp.fc2.{p}",
        openai_clip="transformer.resblocks.{i}.mlp.c_proj.{p}",
        hf_clip="encoder.layers.{i}.mlp.fc2.{p}",
    ),
    NameRow("blocks.{i}.ls2.gamma"),
    # Blocks of Hugging Face DINOv2 (Dinov2Model, Dinov2WithRegistersModel): its legacy q/k/v and attention output
    # names are ViT's (above), the rest its own.
    _hf("blocks.{i}.norm1.{p}", "encoder.layer.{i}.norm1.{p}"),
    *_qkv("", "encoder.layer.{i}.attention.{x}_proj.{p}"),
    NameRow("blocks.{i}.attn.proj.{p}", hf_v5="encoder.layer.{i}.attention.o_proj.{p}"),
    _hf("blocks.{i}.ls1.gamma", "encoder.layer.{i}.layer_scale1.lambda1"),
    _hf("blocks.{i}.norm2.{p}", "encoder.layer.{i}.norm2.{p}"),
    _hf("blocks.{i}.mlp.fc1.{p}", "encoder.layer.{i}.mlp.fc1.{p}"),
    _hf("blocks.{i}.mlp.fc2.{p}", "encoder.layer.{i}.mlp.fc2.{p}"),
    _hf("blocks.{i}.ls2.gamma", "encoder.layer.{i}.layer_scale2.lambda1"),
    # Final norm and heads.
    _hf("norm.{p}", "layernorm.{p}", openai_clip="ln_post.{p}", hf_clip="post_layernorm.{p}"),
    NameRow("fc_norm.{p}"),  # timm's average-pool layout: norm applied after pooling (no `norm.*` then)
    _hf("head.{p}", "classifier.{p}"),  # ViTForImageClassification, DeiTForImageClassification
    _hf("head.{p}", "cls_classifier.{p}"),  # DeiTForImageClassificationWithTeacher
    _hf("head_dist.{p}", "distillation_classifier.{p}"),
)

# Older timm-style spellings: DeiT-III's released LayerScale names (timm's checkpoint_filter_fn renames them) and
# facebookresearch DINOv2's registers.
TIMM_ALIASES: dict[str, str] = {
    "blocks.{i}.gamma_1": "blocks.{i}.ls1.gamma",
    "blocks.{i}.gamma_2": "blocks.{i}.ls2.gamma",
    "register_tokens": "reg_token",
}


@dataclass(frozen=True)
class Naming:
    """A naming convention: its `NAME_TABLE` column, where its names sit, and what it holds besides a ViT."""

    name: str
    column: str  # NameRow field
    prefixes: tuple[str, ...]  # base-model prefixes, most specific first ('' = names at the top level)
    # Not part of the ViT and not changing its output: kept out of the canonical names and reported (`{*}` = any
    # rest). Matched on names without the prefix; names outside it (e.g. HF's `visual_projection`) as they are.
    ignored: tuple[str, ...] = ()
    # Names outside the prefix belong to another model (CLIP's text tower): not read, summed up in a note. '' = they
    # are part of the ViT (Hugging Face classifier heads sit outside the base model).
    other_model: str = ""


_HF_PREFIXES = ("vit.", "deit.", "dinov2.", "dinov2_with_registers.", "")
# timm drops `pre_logits` and DINOv2's `mask_token` the same way; HF's pooler feeds only its own output; CLIP's
# joint-embedding projections map features into the text space (a CLIP image tower is read without a head).
NAMINGS: tuple[Naming, ...] = (
    Naming("timm", "timm", ("",), ignored=("pre_logits.{*}", "mask_token")),
    Naming("hf-legacy", "hf_legacy", _HF_PREFIXES, ignored=("pooler.dense.{p}", "embeddings.mask_token")),
    Naming("hf-v5", "hf_v5", _HF_PREFIXES, ignored=("pooler.dense.{p}", "embeddings.mask_token")),
    Naming("openai-clip", "openai_clip", ("visual.",), ignored=("proj",), other_model="CLIP's text tower"),
    Naming(
        "hf-clip",
        "hf_clip",
        ("vision_model.", ""),
        ignored=("embeddings.position_ids", "visual_projection.weight"),
        other_model="CLIP's text tower",
    ),
)

PLAIN_VIT = "tmconvert converts plain ViTs (absolute position embeddings, GELU MLPs)"
# (what, a tensor only that architecture has): refused in one line before any naming is tried. Matched against the
# end of a stored name, so any prefix (`beit.`, `visual.trunk.`, ...) is covered.
UNSUPPORTED: tuple[tuple[str, str], ...] = (
    ("BEiT-style relative position bias", "relative_position_bias_table"),  # timm and HF BEiT, data2vec-vision
    ("EVA-02 rotary position embedding", "rope.{*}"),
    ("EVA-02 SwiGLU MLP", "mlp.fc1_g.{p}"),  # timm Eva
    ("EVA-02 SwiGLU MLP", "mlp.w1.{p}"),  # baaivision EVA-02
    ("BEiT/EVA-style separate q and v biases", "attn.q_bias"),  # timm Eva (EVA-02 Ti/S: its rope is not stored)
    ("CaiT class-attention stage", "blocks_token_only.{i}.{*}"),
    ("DINOv2 SwiGLU MLP", "mlp.w12.{p}"),  # facebookresearch ViT-g
    ("DINOv2 SwiGLU MLP", "mlp.weights_in.{p}"),  # transformers Dinov2 (use_swiglu_ffn), legacy names
    ("DINOv2 SwiGLU MLP", "mlp.gate_proj.{p}"),  # the same, transformers 5 names
)


@dataclass(frozen=True)
class NameMap:
    """How the canonical tensors are made from stored ones."""

    naming: str
    sources: dict[str, tuple[str, ...]]  # canonical name → stored names (several: concatenated along dim 0)
    ignored: tuple[str, ...]  # stored names that are not timm ViT tensors (e.g. HF `pooler.dense.*`)
    notes: tuple[str, ...] = ()  # what was left out as a whole (CLIP's text tower)


def map_names(stored: dict[str, str], *, path: Path) -> NameMap:
    """Map stored names (given as {name without wrapper prefixes: stored name}) to canonical timm names."""
    _refuse_unsupported(stored, path)
    naming, prefix = detect_naming(stored, path=path)
    rules = _rules(naming)
    ignored_rules = [_pattern(template) for template in naming.ignored]
    parts: dict[str, dict[int | None, str]] = {}
    ignored: list[str] = []
    unknown: list[str] = []
    outside: list[str] = []
    for name, stored_name in stored.items():
        inside = name.startswith(prefix)
        local = name[len(prefix) :] if inside else name
        ours = inside or not naming.other_model  # part of the ViT (or of the file's other model)
        target = _match(rules, local) if ours else None
        if target is None:
            if any(rule.match(local) for rule in ignored_rules):
                ignored.append(stored_name)
            else:
                (unknown if ours else outside).append(stored_name)
            continue
        canonical, part = target
        slot = parts.setdefault(canonical, {})
        if part in slot:
            raise CheckpointError(f"{path}: tensors '{slot[part]}' and '{stored_name}' both map to '{canonical}'")
        slot[part] = stored_name
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} tensor(s) are not part of a ViT/DeiT that tmconvert can represent "
            f"(naming '{naming.name}'): {_some(unknown)}"
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
    notes = (
        (f"{len(outside)} tensor(s) outside '{prefix}' not read (e.g. {naming.other_model}): {_some(outside, 3)}",)
        if outside
        else ()
    )
    return NameMap(naming.name, sources, tuple(ignored), notes)


def detect_naming(stored: dict[str, str], *, path: Path) -> tuple[Naming, str]:
    """The naming convention and the base-model prefix its names sit under ('' when at the top level)."""
    for naming in NAMINGS:
        signatures = [re.escape(template).replace(r"\{i\}", r"\d+") for template in _signatures(naming)]
        for prefix in naming.prefixes:
            found = re.compile(f"^{re.escape(prefix)}({'|'.join(signatures)})$")
            if any(found.match(name) for name in stored):
                return naming, prefix
    expected = " / ".join(
        f"{naming.name} '{naming.prefixes[0]}{_signatures(naming)[0].replace('{i}', 'N')}'" for naming in NAMINGS
    )
    raise CheckpointError(
        f"{path}: not a ViT/DeiT checkpoint: expected blocks' attention weights named as in {expected}; "
        f"found {len(stored)} tensor(s) such as {_some(list(stored)[:5], 5)}"
    )


def _signatures(naming: Naming) -> list[str]:
    """A naming's names for a block's query (or fused qkv) weight: only it has them."""
    names = (_column(row, naming) for row in NAME_TABLE if row.timm == "blocks.{i}.attn.qkv.{p}" and not row.part)
    return list(dict.fromkeys(name.replace("{p}", "weight") for name in names if name))


def _refuse_unsupported(stored: dict[str, str], path: Path) -> None:
    for what, template in UNSUPPORTED:
        signature = re.compile(r"(^|\.)" + _pattern(template).pattern.removeprefix("^"))
        for name, stored_name in stored.items():
            if signature.search(name):
                raise CheckpointError(f"{path}: {what} ({stored_name}) is not supported: {PLAIN_VIT}")


def _column(row: NameRow, naming: Naming) -> str:
    return getattr(row, naming.column)


def _rules(naming: Naming) -> list[tuple[re.Pattern[str], str, int | None]]:
    """(pattern over stored names, canonical template, part) for one naming."""
    if naming.column == "timm":  # the canonical names themselves, fused, and their older spellings
        rows = dict.fromkeys((row.timm, row.timm, None) for row in NAME_TABLE)
        rows.update(dict.fromkeys((alias, target, None) for alias, target in TIMM_ALIASES.items()))
    else:
        rows = dict.fromkeys((_column(row, naming), row.timm, row.part) for row in NAME_TABLE if _column(row, naming))
    return [(_pattern(name), timm, part) for name, timm, part in rows]


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


def _some(names: list[str], shown: int = 6) -> str:
    listed = ", ".join(repr(n) for n in names[:shown])
    return listed + (f" and {len(names) - shown} more" if len(names) > shown else "")
