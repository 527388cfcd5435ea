"""Exponential moving average of one adapter's parameters (the student's, for export and samples).

The official code offers an EMA of the student's angles (``--use_ema``, decay 0.999). A one-step
student trained at a high learning rate moves a lot between neighbouring steps; its average is a
steadier generator. Only the adapter is averaged (the base is frozen), in fp32, beside the live
parameters: ``applied()`` swaps the average in for sampling or export and swaps back.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

__all__ = ["AdapterEMA"]


class AdapterEMA:
    """``shadow = decay * shadow + (1 - decay) * param`` after every update, with the usual warm-up
    ``decay_t = min(decay, (1 + t) / (10 + t))`` so early averages are not dominated by the init."""

    def __init__(self, params: list[nn.Parameter], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.params, self.decay, self.updates = list(params), float(decay), 0
        self.shadow = [p.detach().to(torch.float32).clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().to(s.dtype), 1.0 - d)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in place of the live ones for the ``with`` block."""
        live = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, live):
                    p.copy_(v)

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only (safetensors-ready): the decay, the update count and the averages."""
        return {"decay": torch.tensor(self.decay), "updates": torch.tensor(self.updates),
                **{f"shadow.{i}": s for i, s in enumerate(self.shadow)}}

    def load_state_dict(self, state: dict) -> None:
        if len([k for k in state if k.startswith("shadow.")]) != len(self.shadow):
            raise ValueError("the saved EMA does not match this adapter's parameters (another rank or layer set?)")
        self.updates = int(state["updates"])
        for i, s in enumerate(self.shadow):
            s.copy_(state[f"shadow.{i}"])
