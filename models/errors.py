"""The model library's error type (it imports nothing of the converter, so it owns its own)."""


class ModelConfigError(ValueError):
    """A model config that cannot be built, an unknown model name, or input the model cannot take."""
