"""Adapter base class and the kind registry (PEFT-style: one folder per kind, one registry)."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ClassVar, TypeVar

import torch
from torch import nn

__all__ = ["AdapterModule", "register_adapter", "adapter_class", "check_rank", "ADAPTER_KINDS", "compute_dtype",
           "no_autocast"]

ADAPTER_KINDS: dict[str, type["AdapterModule"]] = {}

T = TypeVar("T", bound=type["AdapterModule"])


def register_adapter(kind: str) -> Callable[[T], T]:
    """Class decorator: make an adapter kind available to ``add_adapter(model, kind, ...)``."""

    def deco(cls: T) -> T:
        if kind in ADAPTER_KINDS and ADAPTER_KINDS[kind] is not cls:
            raise ValueError(f"adapter kind {kind!r} is already registered by {ADAPTER_KINDS[kind].__name__}")
        cls.kind = kind
        ADAPTER_KINDS[kind] = cls
        return cls

    return deco


def adapter_class(kind: str) -> type["AdapterModule"]:
    """The registered class for ``kind``; a clear error listing the known kinds otherwise."""
    try:
        return ADAPTER_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown adapter kind {kind!r}; choose one of {sorted(ADAPTER_KINDS)}") from None


def check_rank(kind: str, rank: int) -> int:
    """The one rank rule, used by ``AdapterSpec``, ``add_adapter`` and every adapter layer.

    Low-rank kinds (``lorad``, ``lora``, ``dora``) need an integer rank >= 1; a kind whose class sets
    ``uses_rank = False`` (``full``: it trains the whole weight) has no rank and takes 0.
    """
    cls = adapter_class(kind)
    if isinstance(rank, bool) or int(rank) != rank:
        raise ValueError(f"adapter rank must be an integer, got {rank!r}")
    if cls.uses_rank and rank < 1:
        raise ValueError(f"a {kind} adapter needs rank >= 1, got {rank}")
    if not cls.uses_rank and rank != 0:
        raise ValueError(f"kind={kind} trains every weight and has no rank, but rank={rank} is set: "
                         f"drop the rank (rank=0), or use a low-rank kind (lorad, lora, dora)")
    return int(rank)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: the autocast dtype when autocast is on, else ``x.dtype``."""
    dev = x.device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except (TypeError, AttributeError, RuntimeError):  # older signatures / device types without autocast
        if dev == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        if dev == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return x.dtype


def no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off for ``device_type`` (explicit dtypes inside), a no-op where autocast is unknown."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


def default_adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapter parameters are at least fp32 (trainable master weights), float64 stays float64."""
    return torch.promote_types(weight.dtype, torch.float32) if weight.is_floating_point() else torch.float32


class AdapterModule(nn.Module):
    """One named adapter of one ``nn.Linear``.

    Subclasses declare their trainable parameters in ``__init__`` and implement ``forward(x, base)``
    (the whole output of the adapted layer, never the base output thrown away), ``merged_weight``,
    and ``merge``/``unmerge`` (in place on the base layer). ``base`` is the layer holding the frozen
    ``weight``/``bias``; it is passed in, never stored, so the adapter's ``parameters()`` are exactly
    its own trainable tensors (what an optimizer or a DeepSpeed engine should see).
    """

    kind: ClassVar[str] = ""
    uses_rank: ClassVar[bool] = True  # False: the kind has no rank (``check_rank`` wants 0)

    def __init__(self, base: nn.Linear, rank: int, dtype: torch.dtype | None = None, **options: Any):
        super().__init__()
        check_rank(self.kind, rank)
        if options:
            raise TypeError(f"{type(self).__name__} got unknown options {sorted(options)}")
        self.rank = int(rank)
        self.in_features = base.in_features
        self.out_features = base.out_features

    def options(self) -> dict[str, Any]:
        """Constructor options besides rank (saved as metadata with the weights)."""
        return {}

    def forward(self, x: torch.Tensor, base: nn.Linear) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def merged_weight(self, base: nn.Linear) -> torch.Tensor:  # pragma: no cover - abstract
        """The effective weight ``W'`` (same dtype as the base weight), without autograd."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self, base: nn.Linear) -> None:
        """Write the effective weight into the base layer."""
        base.weight.data.copy_(self.merged_weight(base))

    @torch.no_grad()
    def unmerge(self, base: nn.Linear) -> None:  # pragma: no cover - abstract
        """Undo :meth:`merge` on the base layer."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"rank={self.rank}, in={self.in_features}, out={self.out_features}"
