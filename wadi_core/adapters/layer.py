"""``AdaptedLinear``: an ``nn.Linear`` that holds several named adapters, at most one active."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterModule

__all__ = ["AdaptedLinear"]


class AdaptedLinear(nn.Linear):
    """Same ``weight``/``bias`` Parameters as the layer it replaces (moved, not copied), so the base
    state-dict keys are unchanged; adapters live under ``adapters.<name>``.

    ``active_adapter`` None means the plain base layer. While an adapter is merged into the base
    weight, only that adapter may be active (the base weight is not the plain base then).
    """

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)  # no fresh weight allocation: take the existing Parameters
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        if linear.bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = linear.bias
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None
        self.train(linear.training)

    def add(self, name: str, adapter: AdapterModule) -> None:
        if name in self.adapters:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        self.adapters[name] = adapter

    def set_active(self, name: str | None) -> None:
        if name is not None and name not in self.adapters:
            name = None  # adapter not on this layer: plain base here
        if self.merged_adapter is not None and name != self.merged_adapter:
            raise RuntimeError(
                f"adapter {self.merged_adapter!r} is merged into the base weights; "
                f"call unmerge_adapter(model, {self.merged_adapter!r}) before activating {name!r}")
        self.active_adapter = name

    def merge(self, name: str) -> None:
        if self.merged_adapter == name:
            return
        if self.merged_adapter is not None:
            raise RuntimeError(f"adapter {self.merged_adapter!r} is already merged; unmerge it first")
        self.adapters[name].merge(self)
        self.merged_adapter = name
        self.active_adapter = name

    def unmerge(self, name: str) -> None:
        if self.merged_adapter != name:
            raise RuntimeError(f"adapter {name!r} is not merged in this layer (merged: {self.merged_adapter!r})")
        self.adapters[name].unmerge(self)
        self.merged_adapter = None

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding this layer's (possibly merged) weight and bias Parameters."""
        with torch.device("meta"):
            lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.weight = self.weight
        if self.bias is not None:
            lin.bias = self.bias
        lin.train(self.training)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active_adapter
        if name is None or name == self.merged_adapter:
            return F.linear(x, self.weight, self.bias)
        return self.adapters[name](x, self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, active={self.active_adapter!r}, merged={self.merged_adapter!r}")
