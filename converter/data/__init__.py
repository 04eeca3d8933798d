"""Images: sources (folders, Fashion-MNIST, synthetic), preprocessing, deterministic loaders, calibration."""
