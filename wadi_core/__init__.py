"""WaDi core: pure PyTorch + diffusers (no Ray, no DeepSpeed, no MLflow)."""

__version__ = "0.1.0"
