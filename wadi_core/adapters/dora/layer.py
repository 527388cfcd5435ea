"""DoRA: ``m * (W + s B A) / |W + s B A|_row`` with the norm detached (as in the DoRA paper / PEFT)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..base import compute_dtype, no_autocast, register_adapter
from ..lora.layer import LoRAAdapter


@register_adapter("dora")
class DoRAAdapter(LoRAAdapter):
    """LoRA's ``A``, ``B`` plus a trainable per-row magnitude ``m`` initialised to the row norms of ``W``."""

    def __init__(self, base: nn.Linear, rank: int, dtype: torch.dtype | None = None,
                 alpha: float | None = None, **options: Any):
        super().__init__(base, rank, dtype, alpha, **options)
        with torch.no_grad():
            self.m = nn.Parameter(base.weight.to(self.A.dtype).norm(dim=1))
        self._merge_norm: torch.Tensor | None = None

    def _direction(self, base: nn.Linear) -> torch.Tensor:
        return base.weight.to(self.A.dtype) + self.scaling * (self.B @ self.A)

    def effective_weight(self, base: nn.Linear) -> torch.Tensor:
        """``m * V / |V|`` with ``|V|`` detached (DoRA section 4.3), in the adapter dtype."""
        with no_autocast(base.weight.device.type):
            v = self._direction(base)
            norm = v.norm(dim=1).detach()
            return (self.m / norm).unsqueeze(1) * v

    def forward(self, x: torch.Tensor, base: nn.Linear) -> torch.Tensor:
        cdt = compute_dtype(x)
        w = self.effective_weight(base).to(cdt)
        b = None if base.bias is None else base.bias.to(cdt)
        with no_autocast(x.device.type):
            return F.linear(x.to(cdt), w, b)

    @torch.no_grad()
    def merged_weight(self, base: nn.Linear) -> torch.Tensor:
        return self.effective_weight(base).to(base.weight.dtype)

    @torch.no_grad()
    def merge(self, base: nn.Linear) -> None:
        self._merge_norm = self._direction(base).norm(dim=1)  # needed to undo the normalisation
        base.weight.data.copy_(self.merged_weight(base))

    @torch.no_grad()
    def unmerge(self, base: nn.Linear) -> None:
        if self._merge_norm is None:
            raise RuntimeError("DoRA unmerge without a previous merge")
        v = base.weight.to(self.A.dtype) * (self._merge_norm / self.m).unsqueeze(1)
        base.weight.data.copy_((v - self.scaling * (self.B @ self.A)).to(base.weight.dtype))
        self._merge_norm = None
