"""The adapters' optimizer: torch AdamW (fp32 state) or bitsandbytes' 8-bit AdamW (the official
``--use_8bit_adam``), chosen by ``VSDConfig.optimizer``."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

__all__ = ["OPTIMIZERS", "make_optimizer", "optimizer_state_bytes"]

OPTIMIZERS = ("adamw", "adamw_8bit")


def _bitsandbytes():
    """bitsandbytes, or an error that says how to get it (it is an optional dependency)."""
    try:
        import bitsandbytes  # noqa: PLC0415 -- an optional dependency (extra adam8bit)
    except ImportError as e:
        raise ImportError("vsd.optimizer=adamw_8bit needs bitsandbytes, which is not installed: "
                          "pip install 'wadi[adam8bit]' (or pip install 'bitsandbytes>=0.48'), "
                          "or use vsd.optimizer=adamw") from e
    return bitsandbytes


def make_optimizer(params: Iterable[nn.Parameter], name: str, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW over ``params`` (eps 1e-8 as the official code); ``name`` is ``adamw`` or ``adamw_8bit``.

    ``adamw_8bit`` keeps both moments as 8-bit blockwise-quantised tensors (blocks of 256 values,
    one fp32 scale each) for every tensor of at least 4,096 elements, fp32 state for smaller ones.
    """
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=1e-8)
    if name == "adamw_8bit":
        return _bitsandbytes().optim.AdamW8bit(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                               eps=1e-8)
    raise ValueError(f"unknown optimizer {name!r}: use one of {OPTIMIZERS}")


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (moments, quantisation maps and scales)."""
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if torch.is_tensor(v))
