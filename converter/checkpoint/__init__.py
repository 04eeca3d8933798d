"""Reading checkpoints: any supported file or folder → canonical timm tensors and a detected config."""
