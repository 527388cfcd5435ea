"""Full fine-tuning expressed as an adapter."""

from .layer import FullAdapter

__all__ = ["FullAdapter"]
