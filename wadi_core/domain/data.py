"""In-memory training sets of domain renders (deterministic from a seed)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from tqdm.auto import tqdm

from wadi_core.domain.attributes import ALL_COMBOS, TRAIN_COMBOS, Attributes, caption
from wadi_core.domain.render import render_with_mask

__all__ = ["RenderSet", "make_render_set", "to_tensor"]


@dataclasses.dataclass
class RenderSet:
    """``images`` uint8 (N,32,32,3), ``masks`` float16 coverage (N,32,32), ``combo`` index into ``combos``."""

    images: np.ndarray
    masks: np.ndarray
    combo: np.ndarray
    combos: tuple[Attributes, ...]

    def captions(self) -> list[str]:
        return [caption(self.combos[i]) for i in self.combo]


def make_render_set(n: int, seed: int, split: str = "train", size: int = 32, progress: bool = False) -> RenderSet:
    """``n`` renders of combinations drawn uniformly from ``split`` with per-image jitter seeds."""
    combos = {"train": TRAIN_COMBOS, "all": ALL_COMBOS}[split]
    rng = np.random.default_rng(seed)
    combo = rng.integers(len(combos), size=n)
    seeds = rng.integers(2**31, size=n)
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), np.float16)
    for i in tqdm(range(n), desc="render", disable=not progress, mininterval=2):
        images[i], masks[i] = render_with_mask(combos[combo[i]], int(seeds[i]), size)
    return RenderSet(images, masks, combo, combos)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B,H,W,3) -> float [-1, 1] (B,3,H,W)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
