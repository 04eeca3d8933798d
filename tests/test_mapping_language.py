"""The mapping language: ops (on real and meta tensors alike), patterns, concat fills, guards, the layer plan."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tmconvert.converter.errors import ConfigError
from tmconvert.converter.lint.mappings import plan_for_names
from tmconvert.converter.mapping.errors import MappingError
from tmconvert.converter.mapping.files import load_mapping
from tmconvert.converter.mapping.ops import keep_prefix, move_token, parse_op, resample_kernel, select, split_qkv
from tmconvert.converter.mapping.schema import Pattern
from tmconvert.converter.plan.layers import plan_layers
from tmconvert.converter.plan.plan import SourceSide, TargetSide, build_plan
from tmconvert.models.vim import VimConfig
from tmconvert.models.vit import ViTConfig

SHIPPED_MLP = Path(__file__).resolve().parents[1] / "mappings" / "vit-vim-mlp.yaml"


def test_move_token_matches_vims_middle_cls_insertion():
    p, d = 196, 8
    pos = torch.randn(1, p + 1, d)  # DeiT layout: cls at 0, then 196 patches
    moved = move_token(pos, src=0, dst="middle")
    middle = p // 2
    # upstream Vim inserts the cls token at P // 2
    expected = torch.cat([pos[:, 1 : 1 + middle], pos[:, 0:1], pos[:, 1 + middle :]], dim=1)
    assert torch.equal(moved, expected)
    assert torch.equal(move_token(pos, src=0, dst=98), expected)
    assert move_token(torch.empty(1, 197, 8, device="meta"), src=0, dst=98).shape == (1, 197, 8)


def test_keep_prefix_and_split_qkv():
    seq = torch.arange(6.0).view(1, 6, 1)  # cls, dist, 4 patches
    assert keep_prefix(seq, prefix=2, keep=1).flatten().tolist() == [0, 2, 3, 4, 5]
    qkv = torch.arange(12.0).view(6, 2)  # D = 2: rows q q k k v v
    assert split_qkv(qkv, part=2).tolist() == [[8, 9], [10, 11]]
    with pytest.raises(ValueError, match="divisible by 3"):
        split_qkv(torch.zeros(4, 2), part=0)


def test_select_checks_the_axis_width():
    t = torch.arange(12.0).view(3, 4)
    assert select(t, dim=1, index=torch.tensor([1, 3]), full=4).tolist() == [[1, 3], [5, 7], [9, 11]]
    with pytest.raises(ValueError, match="dim 0 has 3 entries but the index set chooses among 4"):
        select(t, dim=0, index=torch.tensor([0]), full=4)


def test_resample_kernel_preserves_the_patch_projection():
    """FlexiViT PI-resize: an upsampled patch through the new kernel gives the old embedding."""
    torch.manual_seed(0)
    kernel = torch.randn(5, 3, 4, 4)
    new = resample_kernel(kernel, size=(6, 6))
    assert new.shape == (5, 3, 6, 6)
    patch = torch.randn(2, 3, 4, 4)
    upsampled = F.interpolate(patch, size=(6, 6), mode="bilinear", antialias=True, align_corners=False)
    old_out = torch.einsum("bchw,dchw->bd", patch, kernel)
    new_out = torch.einsum("bchw,dchw->bd", upsampled, new)
    torch.testing.assert_close(new_out, old_out, rtol=1e-4, atol=1e-4)
    assert resample_kernel(kernel, size=(4, 4)) is kernel
    assert resample_kernel(torch.empty(5, 3, 4, 4, device="meta"), size=(2, 2)).shape == (5, 3, 2, 2)


def test_op_parsing_shorthands_and_errors():
    spec, args = parse_op({"split_qkv": "v"})
    assert spec.name == "split_qkv" and args.part == "v"
    _, args = parse_op({"scale": 0.5})
    assert args.factor == 0.5
    _, args = parse_op({"move_token": {"from": 0, "to": "target.cls_index"}})
    assert args.src == 0 and args.dst == "target.cls_index"
    with pytest.raises(ValueError, match="unknown op 'roll'"):
        parse_op({"roll": 1})
    with pytest.raises(ValueError, match="one-key mapping"):
        parse_op({"select": {"dim": 0, "set": "a"}, "scale": 2})


def test_patterns():
    pattern = Pattern("layers.{layer}.mixer.in_proj.weight")
    assert pattern.match("layers.12.mixer.in_proj.weight") == {"layer": 12}
    assert pattern.match("layers.x.mixer.in_proj.weight") is None
    assert pattern.match("layers.1.mixer.in_proj.weight.extra") is None
    assert Pattern("layers.{layer}.mixer.*").match("layers.3.mixer.conv1d_b.bias") == {"layer": 3}
    assert Pattern("head.weight").match("head.weight") == {} and Pattern("norm_f.weight").match("norm.weight") is None


def test_layer_plan():
    assert plan_layers(None, 12, 24).blocks == tuple(range(12)) + (None,) * 12
    assert plan_layers(4, 12, 24).blocks[:5] == (0, 1, 2, 3, None)
    spread = plan_layers(24, 12, 24)
    assert spread.blocks == tuple(j // 2 for j in range(24)) and not spread.warnings
    assert plan_layers(3, 2, 5).blocks == (0, 0, 1, None, None)
    clamped = plan_layers(30, 12, 24)
    assert clamped.inherited == 24 and "exceeds the student's 24 layers" in clamped.warnings[0]
    with pytest.raises(ConfigError, match="at least 1"):
        plan_layers(0, 12, 24)


# A miniature mapping to exercise concat fills, initialisers and overlap detection against a real plan.
_MINI_HEAD = """\
mapping: 1
source: vit
target: vim
index_sets:
  half: {full: source.embed_dim, keep: 2, per: block, score: attn_value, upto: true}
tensors:
  layers.{layer}.mixer.in_proj.weight:
    concat:
      dim: 0
      parts:
        - concat:
            dim: 0
            parts:
              - from: blocks.{block}.attn.qkv.weight
                ops: [{split_qkv: v}, {select: {dim: 0, set: half}}]
              - init: zeros
          size: target.d_inner
        - init: ones
  layers.{layer}.mixer.conv1d.weight: {init: conv_identity}
  layers.{layer}.norm.weight: {init: default}
"""
_OTHER_MIXER = (
    "A_log",
    "D",
    "A_b_log",
    "D_b",
    "conv1d.bias",
    "x_proj.weight",
    "dt_proj.weight",
    "dt_proj.bias",
    "conv1d_b.weight",
    "conv1d_b.bias",
    "x_proj_b.weight",
    "dt_proj_b.weight",
    "dt_proj_b.bias",
    "out_proj.weight",
)
_GLOBALS = (
    "cls_token",
    "pos_embed",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "head.weight",
    "head.bias",
    "norm_f.weight",
)
_VIT = ViTConfig(embed_dim=4, depth=1, num_heads=1, mlp_hidden=16, patch_size=4, img_size=(8, 8), num_classes=3)
_VIM = VimConfig(embed_dim=4, depth=1, d_state=2, patch_size=4, img_size=(8, 8), num_classes=3)


def _mini_plan(tmp_path, rules: str):
    (tmp_path / "mini.yaml").write_text(_MINI_HEAD + rules)
    mapping = load_mapping(tmp_path / "mini.yaml")
    return build_plan(mapping, SourceSide.from_config(_VIT), TargetSide.from_config("mini", _VIM))


def test_overlapping_patterns_are_reported(tmp_path):
    plan = _mini_plan(tmp_path, "  layers.{layer}.mixer.*: {init: default}\n  '*': {init: default}\n")
    messages = [p.message for p in plan.problems]
    assert any("layers.0.mixer.in_proj.weight is produced by 3 rules" in m for m in messages), messages
    assert any("layers.0.norm.weight is produced by 2 rules" in m for m in messages), messages


def test_concat_fills_and_initialisers_through_the_engine(tmp_path):
    from tmconvert.converter.convert.engine import iter_target_tensors

    rules = "".join(f"  layers.{{layer}}.mixer.{n}: {{init: default}}\n" for n in _OTHER_MIXER)
    rules += "".join(f"  {n}: {{init: default}}\n" for n in _GLOBALS)
    plan = _mini_plan(tmp_path, rules)
    assert not plan.problems, [p.message for p in plan.problems]
    in_proj_entry = next(e for e in plan.entries if e.name == "layers.0.mixer.in_proj.weight")
    assert in_proj_entry.kind == "partial" and in_proj_entry.shape == (16, 4)
    assert in_proj_entry.expr == (
        "cat0[cat0[blocks.0.attn.qkv.weight | split_qkv(part=v) | select(dim=0, set=half) ; init:zeros] ; init:ones]"
    )
    qkv = torch.arange(48.0).view(12, 4)
    selection = {"half": {0: torch.tensor([1, 3])}}
    entries = [e for e in plan.entries if e.name.endswith(("in_proj.weight", "mixer.conv1d.weight"))]
    tensors = dict(iter_target_tensors(plan, entries, {"blocks.0.attn.qkv.weight": qkv}.__getitem__, selection, {}))
    in_proj = tensors["layers.0.mixer.in_proj.weight"]
    assert torch.equal(in_proj[:2], qkv[8:12][[1, 3]])  # V rows 1 and 3
    assert not in_proj[2:8].any() and bool((in_proj[8:] == 1).all())  # zeros fill the x half, ones the z half
    conv = tensors["layers.0.mixer.conv1d.weight"]
    assert conv.shape == (8, 1, 4) and conv[:, 0, -1].eq(1).all() and not conv[:, 0, :-1].any()


def test_guard_otherwise_and_source_checks(tmp_path):
    path = tmp_path / "g.yaml"
    head = "mapping: 1\nsource: vit\ntarget: vim\ntensors:\n"
    path.write_text(head + "  x: {from: head.weight, when: {if_equal: [1, 2]}}\n")
    with pytest.raises(MappingError, match="`when` and `otherwise` go together"):
        load_mapping(path)
    path.write_text(head + "  x: {from: a, size: -3x}\n")
    with pytest.raises(MappingError, match=r"g\.yaml:5: tensors\.x\.size"):
        load_mapping(path)


def test_layer_defaults_fill_what_a_layers_section_leaves_out(tmp_path):
    """`layer_defaults` rules produce a per-layer tensor in every layer whose section (`tensors` for inherited
    layers, `rest` for the others) has no rule for it; a section's own rule wins."""
    every_layer = ("in_proj.weight", "conv1d.weight", *_OTHER_MIXER)
    text = "mapping: 1\nsource: vit\ntarget: vim\ntensors:\n"
    text += "  layers.{layer}.mixer.conv1d.weight: {init: conv_identity}\n"
    text += "".join(f"  {n}: {{init: default}}\n" for n in _GLOBALS)
    text += "rest:\n  layers.{layer}.mixer.conv1d.weight: {init: zeros}\n"
    text += "layer_defaults:\n  layers.{layer}.norm.weight: {init: ones}\n"
    text += "".join(f"  layers.{{layer}}.mixer.{n}: {{init: default}}\n" for n in every_layer)
    (tmp_path / "defaults.yaml").write_text(text)
    mapping = load_mapping(tmp_path / "defaults.yaml")
    two_layers = TargetSide.from_config("mini", VimConfig(**{**_VIM.__dict__, "depth": 2}))
    plan = build_plan(mapping, SourceSide.from_config(_VIT), two_layers)  # layer 0 <- block 0; layer 1: rest
    assert not plan.problems and plan.layers.blocks == (0, None)
    rule = {e.name: e.rule for e in plan.entries}
    assert rule["layers.0.mixer.conv1d.weight"] == "tensors.layers.{layer}.mixer.conv1d.weight"
    assert rule["layers.1.mixer.conv1d.weight"] == "rest.layers.{layer}.mixer.conv1d.weight"
    for layer in (0, 1):
        assert rule[f"layers.{layer}.mixer.A_log"] == "layer_defaults.layers.{layer}.mixer.A_log"
        assert rule[f"layers.{layer}.norm.weight"] == "layer_defaults.layers.{layer}.norm.weight"
    assert plan.unused_rules == []  # the conv1d default is shadowed in both layers, which is not a mistake


def test_drops_explain_dropped_tensors_first_match_wins(tmp_path):
    rules = "".join(f"  layers.{{layer}}.mixer.{n}: {{init: default}}\n" for n in _OTHER_MIXER)
    rules += "".join(f"  {n}: {{init: default}}\n" for n in _GLOBALS)
    rules += 'drops:\n  "blocks.*.mlp.*": MLP unused\n  "blocks.*.*.bias": biases\n  "*": everything else\n'
    plan = _mini_plan(tmp_path, rules)
    assert not plan.problems
    why = plan.drop_reasons()
    assert why["blocks.*.mlp.*"] == ("MLP unused", [n for n in plan.dropped if n.startswith("blocks.0.mlp.")])
    assert (
        "blocks.0.mlp.fc1.bias" not in why["blocks.*.*.bias"][1] and "blocks.0.norm1.bias" in why["blocks.*.*.bias"][1]
    )
    assert sorted(n for _, names in why.values() for n in names) == sorted(plan.dropped)
    assert plan.to_json()["dropped_why"]["*"]["why"] == "everything else"


def test_rules_are_found_by_lookup_not_by_trying_each(monkeypatch):
    """Planning stays linear in the number of rules: literal and `{layer}` patterns are looked up, so thousands of
    extra rules cost no pattern matching (a 1,000-rule file took 122 s when every rule was tried on every tensor)."""
    text = SHIPPED_MLP.read_text()
    extra = "".join(f"  extra.{i}.weight: {{init: zeros}}\n" for i in range(2000))
    tried: list[str] = []
    original = Pattern.match
    monkeypatch.setattr(Pattern, "match", lambda self, name: tried.append(self.text) or original(self, name))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "many.yaml"
        path.write_text(text.replace("tensors:\n", "tensors:\n" + extra, 1))
        plan = plan_for_names(load_mapping(path), "deit-s", "vim-s")
        reference = plan_for_names(load_mapping(SHIPPED_MLP), "deit-s", "vim-s")
    assert tried == []
    assert [(e.name, e.rule) for e in plan.entries] == [(e.name, e.rule) for e in reference.entries]
    assert len([r for r in plan.unused_rules if r.startswith("tensors.extra.")]) == 2000
