"""LoRaD: low-rank rotation of weight directions."""

from .function import lorad_linear, rotate_pairs
from .layer import LoRaDAdapter

__all__ = ["LoRaDAdapter", "lorad_linear", "rotate_pairs"]
