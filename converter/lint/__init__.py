"""Checking tmconvert's YAML files without converting anything: what `tmconvert check` and CI run.

A file is checked as what it declares: `mapping: 1` (schema, then semantics on meta tensors for every supported
source/target pair, `mappings.py`) or `recipe: 1` (the distillation recipe schema). Every problem is one line,
`file:line: yaml.path: message`.
"""

from tmconvert.converter.lint.files import FileReport, check_files

__all__ = ["FileReport", "check_files"]
