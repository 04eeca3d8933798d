"""Shipped mapping files (YAML). This package holds data only; `tmconvert.converter` reads it."""
