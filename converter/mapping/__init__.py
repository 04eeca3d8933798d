"""The mapping language: the schema of mapping files, its operations, loading and interpreting them."""
