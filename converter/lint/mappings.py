"""A mapping checked against real architectures, on meta tensors: the code path a conversion runs.

For each (source, target) pair the file supports (default: DeiT-T/S/B x every target of its family) the plan is built
twice: with a plain source and default init for non-inherited layers, and with `--identity-rest` and, where the layout
has one, the distilled variant of the source. Every target tensor must be produced exactly once, every source tensor
must exist, every shape must work out, every index set must fit the axis it selects from; rules that match nothing
and index sets no op uses are reported too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from tmconvert.converter.configs import derive_target_config
from tmconvert.converter.errors import TmconvertError
from tmconvert.converter.mapping.files import LoadedMapping
from tmconvert.converter.mapping.fits import FITS
from tmconvert.converter.mapping.schema import EyeExpr, FitExpr, FromExpr, iter_exprs
from tmconvert.converter.plan.plan import Plan, SourceSide, TargetSide, build_plan
from tmconvert.models import ModelConfigError, family_of, get_config, list_models


def check_mapping(loaded: LoadedMapping) -> tuple[list[tuple[str, str]], list[str]]:
    """(pairs checked, problems) for one schema-valid mapping."""
    spec = loaded.mapping
    problems: list[str] = []
    targets = set(list_models(spec.target))
    for i, name in enumerate(spec.default_for):
        if name != "*" and name not in targets:
            problems.append(f"{loaded.where(f'default_for[{i}]')}: unknown target {name!r}; targets: {sorted(targets)}")

    pairs: list[tuple[str, str]] = []
    for i, (source, target) in enumerate(spec.supports or registry_pairs(targets=sorted(targets))):
        try:
            families = (family_of(get_config(source)), family_of(get_config(target)))
        except (TmconvertError, ModelConfigError) as exc:
            problems.append(f"{loaded.where(f'supports[{i}]')}: {exc}")
            continue
        if families != (spec.source, spec.target):
            problems.append(
                f"{loaded.where(f'supports[{i}]')}: {source} -> {target} is {families[0]} -> {families[1]}, "
                f"the mapping converts {spec.source} -> {spec.target}"
            )
            continue
        pairs.append((source, target))

    by_path: dict[str, tuple[str, list[str]]] = {}
    used_rules: set[str] = set()
    all_rules: set[str] = set()
    used_drops: set[str] = set()
    runs = 0
    for source, target in pairs:
        for distilled, identity_rest in ((False, False), (_can_distil(source), True)):
            runs += 1
            label = (
                f"{source}{'-distilled' if distilled else ''}{' --identity-rest' if identity_rest else ''}->{target}"
            )
            try:
                plan = plan_for_names(loaded, source, target, identity_rest=identity_rest, distilled=distilled)
            except (TmconvertError, ModelConfigError) as exc:
                by_path.setdefault("", (str(exc), []))[1].append(label)
                continue
            for problem in plan.problems:
                message = problem.message + (f" (and {problem.repeats} more tensors)" if problem.repeats else "")
                _, labels = by_path.setdefault(problem.path, (message, []))
                if label not in labels:
                    labels.append(label)
            rules = {f"{s}.{p}" for s, section in spec.rule_sections().items() for p in section}
            all_rules |= rules
            used_rules |= rules - set(plan.unused_rules)
            used_drops |= set(plan.drop_reasons())
    for path, (message, labels) in by_path.items():
        scope = "" if len(labels) == runs else f" [{', '.join(labels)}]"
        where = loaded.where(path) if path else str(loaded.path)
        problems.append(f"{where}: {message}{scope}")
    for rule in sorted(all_rules - used_rules, key=lambda r: loaded.line_of(r) or 0):
        problems.append(f"{loaded.where(rule)}: matches no target tensor in any checked pair")
    for pattern in spec.drops:
        if pattern not in used_drops:
            problems.append(f"{loaded.where(f'drops.{pattern}')}: matches no dropped source tensor in any checked pair")
    used_sets = referenced_sets(loaded)
    for name in spec.index_sets:
        if name not in used_sets:
            problems.append(f"{loaded.where(f'index_sets.{name}')}: index set {name!r} is declared but no op uses it")
    return pairs, problems


def referenced_sets(mapping: LoadedMapping) -> dict[str, list[str]]:
    """Index set name -> YAML paths of the ops that use it (for `check`'s unused / unknown set reports)."""
    out: dict[str, list[str]] = {}
    for section, rules in mapping.mapping.rule_sections().items():
        for pattern, rule in rules.items():
            roots = [(rule.expr, f"{section}.{pattern}")]
            if rule.otherwise is not None:
                roots.append((rule.otherwise, f"{section}.{pattern}.otherwise"))
            for root, root_path in roots:
                for expr, path in iter_exprs(root, root_path):
                    if isinstance(expr, (FromExpr, EyeExpr)):
                        for i, op in enumerate(expr.ops):
                            for name in op.referenced_sets():  # `residual@-1`: a stage of `residual`
                                out.setdefault(name.partition("@")[0], []).append(f"{path}.ops[{i}]")
                    elif isinstance(expr, FitExpr):
                        for name in FITS[expr.fit].sets:
                            out.setdefault(name, []).append(f"{path}.fit")
    return out


def _can_distil(source: str) -> bool:
    """Whether the source layout has a distilled variant (the config says: a dist token needs a cls token, ...)."""
    try:
        dataclasses.replace(get_config(source), distilled=True)
    except ModelConfigError:
        return False
    return True


def plan_for_names(
    mapping: LoadedMapping,
    source_name: str,
    target_name: str,
    *,
    layers: int | None = None,
    identity_rest: bool | None = None,
    distilled: bool = False,
) -> Plan:
    """A plan between two registry configs (what `check` verifies), with no checkpoint."""
    source_cfg = get_config(source_name)
    if distilled:
        source_cfg = dataclasses.replace(source_cfg, distilled=True)
    target = TargetSide.from_config(target_name, derive_target_config(target_name, source_cfg))
    return build_plan(mapping, SourceSide.from_config(source_cfg), target, layers=layers, identity_rest=identity_rest)


def registry_pairs(
    sources: Sequence[str] = ("deit-t", "deit-s", "deit-b"), *, targets: Sequence[str]
) -> list[tuple[str, str]]:
    """What a mapping without `supports` is checked on: DeiT-T/S/B x every registered target of its family."""
    return [(s, t) for s in sources for t in targets]
