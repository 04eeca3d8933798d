"""Shipped distillation recipes (YAML). This package holds data only; `tmconvert.converter.distill` reads it."""
