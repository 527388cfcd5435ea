"""Improved precision and recall (Kynkaanniemi et al. 2019), computed in row blocks.

Each point's radius is the distance to its k-th nearest neighbour in its own set (the zero
self-distance skipped). Precision: share of generated points inside some real point's ball;
recall: share of real points inside some generated point's ball. Distances are never held as
a full N x N matrix: ``block`` rows at a time (30k x 30k fits in a few GB).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["precision_recall", "knn_radii"]


def _as_tensor(x: Any, dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.from_numpy(np.asarray(x))
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D (n, dim), got shape {tuple(x.shape)}")
    return x.to(device=device, dtype=dtype)


def _sq_dists(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    d = (a * a).sum(1, keepdim=True) + b_sq[None, :] - 2 * a @ b.T
    return d.clamp_min_(0)


def knn_radii(x: torch.Tensor, k: int = 3, block: int = 10000) -> torch.Tensor:
    """Squared distance of every row of ``x`` to its k-th nearest other row."""
    if x.shape[0] <= k:
        raise ValueError(f"need more than k={k} points for k-NN radii, have {x.shape[0]}")
    x_sq = (x * x).sum(1)
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], block):
        d = _sq_dists(x[start:start + block], x, x_sq)
        # k+1 smallest: the smallest is the point itself (distance 0)
        out[start:start + block] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return out


def _coverage(query: torch.Tensor, ref: torch.Tensor, ref_radii: torch.Tensor, block: int) -> float:
    """Share of ``query`` rows inside at least one ball (centre ``ref``, squared radius ``ref_radii``)."""
    ref_sq = (ref * ref).sum(1)
    inside = 0
    for start in range(0, query.shape[0], block):
        d = _sq_dists(query[start:start + block], ref, ref_sq)
        inside += int((d <= ref_radii[None, :]).any(dim=1).sum())
    return inside / query.shape[0]


def precision_recall(real: Any, fake: Any, k: int = 3, block: int = 10000,
                     dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                     ) -> dict[str, float]:
    """``{"precision": p, "recall": r}`` of ``fake`` against ``real`` features ``(n, dim)``."""
    real_t, fake_t = _as_tensor(real, dtype, device), _as_tensor(fake, dtype, device)
    if real_t.shape[1] != fake_t.shape[1]:
        raise ValueError(f"real and fake feature dims differ: {real_t.shape[1]} vs {fake_t.shape[1]}")
    with torch.no_grad():
        real_r = knn_radii(real_t, k, block)
        fake_r = knn_radii(fake_t, k, block)
        precision = _coverage(fake_t, real_t, real_r, block)
        recall = _coverage(real_t, fake_t, fake_r, block)
    return {"precision": precision, "recall": recall}
