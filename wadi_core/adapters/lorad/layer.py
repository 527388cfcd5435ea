"""LoRaD adapter: low-rank rotation of each row's direction (WaDi, arXiv 2603.08258)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..base import AdapterModule, compute_dtype, default_adapter_dtype, register_adapter
from .function import angle_dtype, lorad_linear, rotate_pairs


@register_adapter("lorad")
class LoRaDAdapter(AdapterModule):
    """Trainable ``A (out, r)`` zeros and ``B (r, in/2)`` xavier-uniform; ``Theta = A @ B``.

    ``W_rot`` rotates the adjacent column pairs of ``W`` by ``Theta``: row norms are preserved
    exactly, only directions change. ``r * (out + in/2)`` trainable parameters per layer.
    """

    def __init__(self, base: nn.Linear, rank: int, dtype: torch.dtype | None = None, **options: Any):
        super().__init__(base, rank, dtype, **options)
        if base.in_features % 2:
            raise ValueError(
                f"LoRaD rotates pairs of input columns and needs an even input width; this layer has "
                f"in_features={base.in_features}. Leave it out of the targets or use another kind.")
        dev = base.weight.device
        dt = dtype or default_adapter_dtype(base.weight)
        self.A = nn.Parameter(torch.zeros(base.out_features, self.rank, device=dev, dtype=dt))
        self.B = nn.Parameter(torch.empty(self.rank, base.in_features // 2, device=dev, dtype=dt))
        nn.init.xavier_uniform_(self.B)

    def theta(self) -> torch.Tensor:
        """Angles ``A @ B`` of shape ``(out, in/2)`` in fp32 (or float64)."""
        adt = angle_dtype(self.A, self.B)
        return self.A.to(adt) @ self.B.to(adt)

    def forward(self, x: torch.Tensor, base: nn.Linear) -> torch.Tensor:
        return lorad_linear(x, base.weight, base.bias, self.A, self.B, compute_dtype(x))

    @torch.no_grad()
    def merged_weight(self, base: nn.Linear) -> torch.Tensor:
        return rotate_pairs(base.weight, self.theta()).to(base.weight.dtype)

    @torch.no_grad()
    def unmerge(self, base: nn.Linear) -> None:
        # Exact inverse: rotate back by -Theta (no matrix inverse, no stored copy).
        base.weight.data.copy_(rotate_pairs(base.weight, -self.theta()).to(base.weight.dtype))
