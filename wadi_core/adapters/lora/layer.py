"""LoRA: ``W + (alpha / r) B A`` with ``B`` zero-initialised (the ablation baseline)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..base import AdapterModule, default_adapter_dtype, register_adapter


@register_adapter("lora")
class LoRAAdapter(AdapterModule):
    """Trainable ``A (r, in)`` (kaiming-uniform, as PEFT) and ``B (out, r)`` zeros; ``alpha`` defaults to ``r``.

    The forward adds the low-rank path to the base output (``x W^T + s (x A^T) B^T``): the base
    matmul is part of the result, nothing is computed and thrown away.
    """

    def __init__(self, base: nn.Linear, rank: int, dtype: torch.dtype | None = None,
                 alpha: float | None = None, **options: Any):
        super().__init__(base, rank, dtype, **options)
        dev = base.weight.device
        dt = dtype or default_adapter_dtype(base.weight)
        self.alpha = float(alpha) if alpha is not None else float(self.rank)
        self.scaling = self.alpha / self.rank
        self.A = nn.Parameter(torch.empty(self.rank, base.in_features, device=dev, dtype=dt))
        self.B = nn.Parameter(torch.zeros(base.out_features, self.rank, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def options(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def forward(self, x: torch.Tensor, base: nn.Linear) -> torch.Tensor:
        y = F.linear(x, base.weight, base.bias)
        h = F.linear(x, self.A.to(x.dtype))
        # y + s * h B^T in one addmm: no separate (tokens x out) temporaries for h B^T and its scaling
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, self.rank), self.B.to(x.dtype).t(),
                          alpha=self.scaling)
        return out.view(y.shape)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``(alpha / r) B A`` in the adapter dtype."""
        return self.scaling * (self.B @ self.A)

    @torch.no_grad()
    def merged_weight(self, base: nn.Linear) -> torch.Tensor:
        return (base.weight.to(self.A.dtype) + self.delta_weight()).to(base.weight.dtype)

    @torch.no_grad()
    def unmerge(self, base: nn.Linear) -> None:
        base.weight.data.copy_((base.weight.to(self.A.dtype) - self.delta_weight()).to(base.weight.dtype))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", alpha={self.alpha:g}"
