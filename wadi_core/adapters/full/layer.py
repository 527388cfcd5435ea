"""Full fine-tuning as an adapter: a trainable copy of the layer's weight (and bias) per name."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..base import AdapterModule, default_adapter_dtype, register_adapter


@register_adapter("full")
class FullAdapter(AdapterModule):
    """``weight`` (and ``bias``) copied from the base at creation; no rank (``rank=0``).

    Merge writes the copy into the base and keeps the base values to restore on unmerge.
    """

    uses_rank = False

    def __init__(self, base: nn.Linear, rank: int = 0, dtype: torch.dtype | None = None, **options: Any):
        super().__init__(base, rank, dtype, **options)
        dt = dtype or default_adapter_dtype(base.weight)
        with torch.no_grad():
            self.weight = nn.Parameter(base.weight.detach().to(dt).clone())
            self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().to(dt).clone())
        self._saved: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor, base: nn.Linear) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), b)

    @torch.no_grad()
    def merged_weight(self, base: nn.Linear) -> torch.Tensor:
        return self.weight.to(base.weight.dtype)

    @torch.no_grad()
    def merge(self, base: nn.Linear) -> None:
        self._saved = (base.weight.detach().clone(), None if base.bias is None else base.bias.detach().clone())
        base.weight.data.copy_(self.weight)
        if base.bias is not None and self.bias is not None:
            base.bias.data.copy_(self.bias)

    @torch.no_grad()
    def unmerge(self, base: nn.Linear) -> None:
        if self._saved is None:
            raise RuntimeError("full-weight adapter unmerge without a previous merge")
        w, b = self._saved
        base.weight.data.copy_(w)
        if b is not None:
            base.bias.data.copy_(b)
        self._saved = None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"
