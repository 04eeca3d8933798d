"""`tmconvert check`: every shipped mapping and recipe passes; planted mistakes are all reported in one run, with
locations; each file is checked as the kind of file it declares."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tmconvert.converter.cli import main
from tmconvert.converter.distill.recipe import shipped_recipe_paths
from tmconvert.converter.lint import check_files
from tmconvert.converter.mapping.files import shipped_mapping_paths

REPO = Path(__file__).resolve().parents[1]
MAPPINGS = REPO / "mappings"
RECIPES = REPO / "recipes"


def test_ci_check_of_the_mappings_and_recipes_folders(capsys):
    """What CI runs: `tmconvert check mappings/*.yaml recipes/*.yaml`."""
    mappings, recipes = sorted(MAPPINGS.glob("*.yaml")), sorted(RECIPES.glob("*.yaml"))
    assert len(mappings) >= 2 and len(recipes) >= 1
    assert main(["check", *map(str, mappings + recipes)]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert out.count("ok") == len(mappings) + len(recipes) and "deit-b->vim-s" in out and "(recipe)" in out


def test_default_is_the_shipped_mappings_and_recipes(capsys):
    shipped = {p.name for p in shipped_mapping_paths()} | {p.name for p in shipped_recipe_paths().values()}
    assert shipped == {p.name for p in [*MAPPINGS.glob("*.yaml"), *RECIPES.glob("*.yaml")]} >= {"default.yaml"}
    assert main(["check", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert all(f["ok"] for f in report["files"]) and {Path(f["path"]).name for f in report["files"]} == shipped
    assert {f["kind"] for f in report["files"]} == {"mapping", "recipe"}


def _broken_copy(tmp_path: Path, edits: list[tuple[str, str]], name: str = "broken.yaml") -> Path:
    text = (MAPPINGS / "vit-vim-mlp.yaml").read_text()
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new, 1)
    path = tmp_path / name
    path.write_text(text)
    return path


def test_check_reports_all_semantic_problems_at_once(tmp_path, capsys):
    path = _broken_copy(
        tmp_path,
        [
            ('default_for: [vim-t, vim-s, vim-b, vim-t-stride8, vim-s-stride8, "*"]', "default_for: [vim-q]"),
            # 1. a source tensor that does not exist
            ("    from: patch_embed.proj.bias\n", "    from: patch_embed.proj.bais\n"),
            # 2. an index set used on an axis of the wrong width (hidden units on the residual axis)
            (
                "    from: blocks.{block}.norm2.weight\n    ops: [{select: {dim: 0, set: residual}}]",
                "    from: blocks.{block}.norm2.weight\n    ops: [{select: {dim: 0, set: hidden}}]",
            ),
            # 2b. a per-block index set where no block exists
            (
                "  cls_token:\n    from: cls_token\n    ops: [{select: {dim: 2, set: residual}}]",
                "  cls_token:\n    from: cls_token\n    ops: [{select: {dim: 2, set: hidden}}]",
            ),
            # 3. an unknown index set
            (
                "    from: norm.weight\n    ops: [{select: {dim: 0, set: residual}}]",
                "    from: norm.weight\n    ops: [{select: {dim: 0, set: residdual}}]",
            ),
            # 4. a target tensor no rule produces (D, in inherited and in other layers)
            (
                "  layers.{layer}.mixer.D: {init: default, dtype: float32}\n  layers.{layer}.mixer.A_b_log",
                "  layers.{layer}.mixer.A_b_log",
            ),
            # 5. a tensor produced twice (rest already has an out_proj rule)
            (
                "  layers.{layer}.mixer.out_proj.weight: {init: default}\n",
                "  layers.{layer}.mixer.out_proj.weight: {init: default}\n"
                "  layers.{layer}.mixer.out_*: {init: zeros}\n",
            ),
            # 6. a shape that does not work out (out_proj without the hidden selection)
            (
                "      - select: {dim: 1, set: hidden}\n      - scale: {sqrt_ratio: hidden}",
                "      - scale: {sqrt_ratio: hidden}",
            ),
            # 7. a rule that matches nothing
            ("  norm_f.weight:", "  norm_g.weight: {init: ones}\n  norm_f.weight:"),
        ],
    )
    assert main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    problems = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert len(problems) == 10, out
    expected = [
        r"default_for\[0\]: unknown target 'vim-q'",
        r"tensors\.patch_embed\.proj\.bias\.from: source tensor patch_embed\.proj\.bais does not exist",
        r"tensors\.layers\.\{layer\}\.norm\.weight\.ops\[0\]: select on blocks\.0\.norm2\.weight \(\d+,\): dim 0 has "
        r"\d+ entries but the index set chooses among \d+ \(and 11 more tensors\)",
        r"tensors\.cls_token\.ops\[0\]: select on cls_token .*index set 'hidden' is chosen per teacher block, but "
        r"this rule has no block",
        r"tensors\.norm_f\.weight\.ops\[0\]: .*unknown index set 'residdual'",
        r"tensors: no rule produces layers\.\{layer\}\.mixer\.D ",
        r"rest: no rule produces layers\.\{layer\}\.mixer\.D ",
        r"rest\.layers\.\{layer\}\.mixer\.out_\*: target tensor layers\.\d+\.mixer\.out_proj\.weight is produced by 2 "
        r"rules",
        r"tensors\.layers\.\{layer\}\.mixer\.out_proj\.weight: produces \(\d+, \d+\) but target "
        r"layers\.0\.mixer\.out_proj\.weight is",
        r"tensors\.norm_g\.weight: matches no target tensor in any checked pair",
    ]
    for pattern in expected:
        assert any(re.search(pattern, p) for p in problems), f"{pattern}\n" + "\n".join(problems)
    # every message is `file:line: yaml.path: message`, the line pointing at the YAML node
    text = path.read_text().splitlines()
    for problem in problems:
        m = re.match(rf"{re.escape(str(path))}:(\d+): ", problem)
        assert m, problem
        assert 1 <= int(m.group(1)) <= len(text)
    line_of_bais = next(i for i, line in enumerate(text, 1) if "patch_embed.proj.bais" in line)
    assert any(p.startswith(f"{path}:{line_of_bais}: ") for p in problems)


def test_check_reports_schema_problems_at_once(tmp_path, capsys):
    path = tmp_path / "schema.yaml"
    path.write_text(
        "mapping: 1\n"
        "source: vit\n"
        "target: vim\n"
        "index_sets:\n"
        "  residual: {full: source.embed_dim, keep: target.embed_dim, score: loudness}\n"
        "tensors:\n"
        "  cls_token:\n"
        "    from: cls_token\n"
        "    ops:\n"
        "      - select: {dim: 2, set: residual}\n"
        "      - rotate: 90\n"
        "  pos_embed: {init: random}\n"
        '  head.weight: {from: "blocks.{blk}.x"}\n'
        "  norm_f.weight: {init: ones}\n"
        "  norm_f.weight: {init: zeros}\n"
    )
    assert main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    for expected in (
        f"{path}:15: tensors.norm_f.weight: duplicate key",
        f"{path}:5: index_sets.residual.score: Input should be 'residual', 'mlp_hidden' or 'attn_value'",
        f"{path}:12: tensors.pos_embed.init: Input should be 'default', 'zeros', 'ones', 'conv_identity', 'dirac' or "
        "'space_to_depth'",
        f"{path}:13: tensors.head.weight.from: unknown placeholder {{blk}}",
        f"{path}:11: tensors.cls_token.ops[1]: unknown op 'rotate'",
    ):
        assert expected in out, out


def test_unsafe_yaml_is_refused_not_executed(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"mapping: !!python/object/apply:os.system ['touch {marker}']\nsource: vit\n")
    assert main(["check", str(path)]) == 1
    assert "not valid YAML" in capsys.readouterr().out
    assert not marker.exists()


def test_two_files_claiming_one_default(tmp_path):
    a = _broken_copy(tmp_path, [], "a.yaml")
    b = _broken_copy(tmp_path, [], "b.yaml")
    reports = check_files([a, b])
    assert reports[0].ok
    assert any("'vim-t' is also the default of" in p for p in reports[1].problems)


@pytest.mark.parametrize("pairs", [[["deit-t", "vim-s"]]])
def test_unsupported_pair_is_explained(tmp_path, capsys, pairs):
    text = (MAPPINGS / "vit-vim-mlp.yaml").read_text()
    start = text.index("supports:")
    end = text.index("# Source layouts")
    path = tmp_path / "wide.yaml"
    path.write_text(text[:start] + f"supports: {json.dumps(pairs)}\n" + text[end:])
    assert main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "index_sets.residual: keeps 384 (target.embed_dim) of 192 (source.embed_dim) entries" in out


def test_files_are_checked_as_what_they_declare(tmp_path, capsys):
    (tmp_path / "recipe.yaml").write_text("recipe: 1\nsteps: 10\noptim:\n  lr: -1\n  nosuch: 2\n")
    (tmp_path / "mapping.yaml").write_text("mapping: 1\n")
    (tmp_path / "typo.yaml").write_text("mappin: 1\n")
    (tmp_path / "bad.yaml").write_text("mapping: [\n")
    reports = check_files([tmp_path / n for n in ("recipe.yaml", "mapping.yaml", "typo.yaml", "bad.yaml")])
    assert [r.kind for r in reports] == ["recipe", "mapping", None, None]
    recipe, mapping, typo, bad = (r.problems for r in reports)
    assert recipe == [
        f"{tmp_path / 'recipe.yaml'}:4: optim.lr: Input should be greater than 0",
        f"{tmp_path / 'recipe.yaml'}:5: optim.nosuch: Extra inputs are not permitted",
    ]
    assert any("source: Field required" in p for p in mapping)
    assert typo == [
        f"{tmp_path / 'typo.yaml'}: not a tmconvert file: expected a YAML mapping that declares "
        "`mapping: 1` or `recipe: 1`"
    ]
    assert len(bad) == 1 and bad[0].startswith(f"{tmp_path / 'bad.yaml'}:2: not valid YAML")
    assert main(["check", str(tmp_path / "recipe.yaml")]) == 1
    assert "recipe.yaml:4: optim.lr: Input should be greater than 0" in capsys.readouterr().out
