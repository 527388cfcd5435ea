"""LoRA adapters."""

from .layer import LoRAAdapter

__all__ = ["LoRAAdapter"]
