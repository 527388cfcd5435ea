"""The random draws of a VSD step (noise, timesteps, null-prompt coins), from one generator or keyed
per sample.

``GeneratorDraws`` takes every draw of the batch from one ``torch.Generator``, in call order: what a
fixed-size run does (the generator's state is checkpointed per rank). ``KeyedDraws`` gives each sample
its own generator seeded by (seed, epoch, global sample index), so a sample's noise, timesteps and coin
flips are the same whichever rank holds it and however many ranks there are: an elastic run that
resizes draws what a fixed-size run would have drawn, and nothing random needs checkpointing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["Draws", "GeneratorDraws", "KeyedDraws", "sample_seed", "slice_draws"]


class Draws(Protocol):
    """What a VSD step draws; each method returns one row per sample of the batch, on ``device``."""

    def normal(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """Standard normal, ``shape[0]`` = batch."""
        ...

    def integers(self, low: int, high: int, n: int, device: torch.device) -> Tensor:
        """Uniform integers in ``[low, high)``, one per sample."""
        ...

    def uniform(self, n: int, device: torch.device) -> Tensor:
        """Uniform in ``[0, 1)``, one per sample."""
        ...


class GeneratorDraws:
    """Every draw from one generator, in call order (bit-identical to drawing from it directly)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def normal(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        return torch.randn(shape, generator=self.generator, device=self.generator.device).to(device)

    def integers(self, low: int, high: int, n: int, device: torch.device) -> Tensor:
        return torch.randint(low, high, (n,), generator=self.generator, device=self.generator.device).to(device)

    def uniform(self, n: int, device: torch.device) -> Tensor:
        return torch.rand(n, generator=self.generator, device=self.generator.device).to(device)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample: a hash of (seed, epoch, global sample index), so that nearby
    keys give unrelated streams (``manual_seed(seed + index)`` would overlap for consecutive runs)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


class KeyedDraws:
    """Each sample's draws from its own CPU generator keyed by (seed, epoch, global sample index)."""

    def __init__(self, seed: int, epoch: int, indices: Sequence[int]) -> None:
        if not len(indices):
            raise ValueError("KeyedDraws needs the global index of at least one sample")
        self.indices = list(indices)
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, epoch, i)) for i in self.indices]

    def _check(self, n: int) -> None:
        if n != len(self.generators):
            raise ValueError(f"a draw for {n} samples from KeyedDraws over {len(self.generators)} sample keys")

    def normal(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        self._check(shape[0])
        return torch.stack([torch.randn(shape[1:], generator=g) for g in self.generators]).to(device)

    def integers(self, low: int, high: int, n: int, device: torch.device) -> Tensor:
        self._check(n)
        return torch.cat([torch.randint(low, high, (1,), generator=g) for g in self.generators]).to(device)

    def uniform(self, n: int, device: torch.device) -> Tensor:
        self._check(n)
        return torch.cat([torch.rand(1, generator=g) for g in self.generators]).to(device)


def slice_draws(seed: int, epoch: int, batch_index: int, global_batch: int, start: int, stop: int) -> KeyedDraws:
    """The draws of samples ``[start, stop)`` of global batch ``batch_index`` of an epoch (a rank's
    share): sample ``j`` is global sample ``batch_index * global_batch + j``, so the global batch draws
    the same whatever the world size that splits it."""
    first = batch_index * global_batch
    return KeyedDraws(seed, epoch, range(first + start, first + stop))
