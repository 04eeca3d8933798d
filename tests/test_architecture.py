"""The dependency rule of the code base, checked on the imports of every module (docs/architecture.md).

Dependencies point one way: `kernels` imports nothing of the project, `models` only `kernels`; inside the
converter each stage imports only the stages before it, conversion never imports distillation (nor the reverse),
and the CLI, at the edge, is the only place that sees everything; its commands do not import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The converter's shared basics: the version, the root error, the dtype table, YAML reading, model configs.
BASICS = {"converter", "converter.errors", "converter.dtypes", "converter.yamlfile", "converter.configs"}
ALLOWED: dict[str, set[str]] = {
    "kernels": set(),
    "models": {"kernels"},
    "converter": set(),
    "converter.errors": set(),
    "converter.dtypes": {"converter.errors"},
    "converter.yamlfile": {"converter.errors"},
    "converter.configs": {"converter.errors", "models"},
    "converter.checkpoint": BASICS | {"models"},
    "converter.data": BASICS | {"models"},
    "converter.mapping": BASICS | {"models"},
    "converter.plan": BASICS | {"converter.mapping", "models"},
    "converter.modelfile": BASICS | {"converter.checkpoint", "models"},
    "converter.verify": BASICS | {"converter.checkpoint", "converter.data", "converter.modelfile", "models", "kernels"},
    "converter.convert": BASICS
    | {
        "converter.checkpoint",
        "converter.data",
        "converter.mapping",
        "converter.plan",
        "converter.modelfile",
        "converter.verify",
        "models",
    },
    "converter.distill": BASICS | {"converter.checkpoint", "converter.data", "converter.modelfile", "models"},
    "converter.lint": BASICS | {"converter.mapping", "converter.plan", "converter.distill", "models"},
}
CLI_SHARED = {
    "tmconvert.converter.cli._console",
    "tmconvert.converter.cli._options",
    "tmconvert.converter.cli._reports",
}


def _package(module: str) -> str:
    """`tmconvert.converter.plan.plan` -> `converter.plan`; `tmconvert.models.vim` -> `models`."""
    parts = module.split(".")[1:]
    return ".".join(parts[:2]) if parts[0] == "converter" and len(parts) > 1 else parts[0]


def _modules() -> dict[str, Path]:
    files = [p for folder in ("converter", "models", "kernels") for p in (ROOT / folder).rglob("*.py")]
    return {
        "tmconvert." + ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in files
    }


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {name for name in found if name.startswith("tmconvert.")}


def test_every_package_imports_only_what_the_rule_allows() -> None:
    modules = _modules()
    known = set(modules)
    broken = []
    for module, path in modules.items():
        package = _package(module)
        if package == "converter.cli":
            continue
        assert package in ALLOWED, f"{module}: package {package} is not in the dependency table"
        for name in _imports(path):
            if name not in known:  # `from pkg import symbol`: only the module itself counts
                continue
            target = _package(name)
            if target != package and target not in ALLOWED[package]:
                broken.append(f"{module} imports {name}")
    assert not broken, "\n".join(broken)


def test_cli_commands_do_not_import_each_other() -> None:
    modules = _modules()
    commands = {m: p for m, p in modules.items() if m.startswith("tmconvert.converter.cli.")}
    for module, path in commands.items():
        if module in CLI_SHARED:
            continue
        others = {name for name in _imports(path) if name in commands and name not in CLI_SHARED}
        assert not others, f"{module} imports {others}"


def test_nothing_below_the_cli_imports_it() -> None:
    for module, path in _modules().items():
        if _package(module) != "converter.cli":
            assert not any(_package(n) == "converter.cli" for n in _imports(path)), module
