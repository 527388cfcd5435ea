"""DoRA adapters."""

from .layer import DoRAAdapter

__all__ = ["DoRAAdapter"]
