"""The converted-model file: atomic writes, streamed safetensors, tmconvert metadata, loading models back."""
