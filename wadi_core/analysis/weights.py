"""Per-row norm and direction change between two weight sets (the observation behind WaDi, arXiv 2603.08258).

For every output unit (row ``w_n`` of ``W`` in ``(out, in)`` layout; conv kernels flattened to
``(out, in*kh*kw)``), with ``w`` from the reference (teacher) and ``w'`` from the candidate (student):
``dM_n = | |w'_n| - |w_n| | / |w_n|`` and ``dD_n = 1 - cos(w'_n, w_n)``. Per layer: mean and std over
rows, in percent; the all-layer figure is the mean over layers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = [
    "LayerChange", "WeightComparison", "row_changes", "residual_svd_energy", "compare_weights",
    "analysable_keys", "swap_norm", "swap_direction", "swap_state_dict",
]

_EPS = 1e-30


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``(out, prod(rest))`` float64 view of a 2D+ weight."""
    return t.detach().reshape(t.shape[0], -1).to(torch.float64)


def row_changes(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(dM, dD)`` as float64 fractions (not percent). Rows with a zero reference norm give NaN."""
    if reference.shape != candidate.shape:
        raise ValueError(f"shape mismatch: reference {tuple(reference.shape)} vs candidate {tuple(candidate.shape)}")
    w, wc = _rows(reference), _rows(candidate)
    n, nc = w.norm(dim=1), wc.norm(dim=1)
    ok = n > 0
    safe_n = torch.where(ok, n, torch.ones_like(n))
    d_norm = torch.where(ok, (nc - n).abs() / safe_n, torch.full_like(n, float("nan")))
    cos = (w * wc).sum(dim=1) / (safe_n * nc.clamp_min(_EPS))
    d_dir = torch.where(ok & (nc > 0), 1.0 - cos, torch.full_like(n, float("nan")))
    return d_norm, d_dir


def residual_svd_energy(reference: torch.Tensor, candidate: torch.Tensor, fraction: float = 0.3) -> float:
    """Share of the squared singular values of ``V_S - V_T`` (row-normalised) kept by the top
    ``ceil(fraction * rank)`` of them; NaN when the directions are unchanged (up to float rounding)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    w, wc = _rows(reference), _rows(candidate)
    resid = wc / wc.norm(dim=1, keepdim=True).clamp_min(_EPS) - w / w.norm(dim=1, keepdim=True).clamp_min(_EPS)
    # Singular values through the small Gram matrix (eigvalsh, float64): much cheaper than an SVD
    # of a wide conv kernel, same squared singular values.
    gram = resid @ resid.T if resid.shape[0] <= resid.shape[1] else resid.T @ resid
    energy = torch.linalg.eigvalsh(gram).clamp_min(0).flip(0)
    total = float(energy.sum())
    # 1 - cos = |r|^2 / 2 per row: below ~1e-12 per row the residual is float rounding, not a change
    if total <= 1e-12 * resid.shape[0]:
        return float("nan")
    k = max(1, math.ceil(fraction * min(resid.shape)))
    return float(energy[:k].sum()) / total


@dataclass(frozen=True)
class LayerChange:
    """One weight's summary; percentages of the per-row changes."""

    name: str
    shape: tuple[int, ...]
    rows: int
    norm_mean_pct: float
    norm_std_pct: float
    dir_mean_pct: float
    dir_std_pct: float
    svd_energy: float | None = None


@dataclass
class WeightComparison:
    """Per-layer changes, the pooled per-row values (for histograms) and what was skipped and why."""

    layers: list[LayerChange]
    row_norm_pct: np.ndarray
    row_dir_pct: np.ndarray
    skipped: dict[str, str] = field(default_factory=dict)
    svd_fraction: float = 0.3

    def summary(self) -> dict[str, float | int]:
        """All-layer figures: mean over layers of the per-layer mean and std (percent)."""
        if not self.layers:
            raise ValueError("no comparable 2D+ weights: are these checkpoints of the same architecture?")
        col = {k: np.array([getattr(l, k) for l in self.layers], dtype=np.float64)
               for k in ("norm_mean_pct", "norm_std_pct", "dir_mean_pct", "dir_std_pct")}
        out: dict[str, float | int] = {
            "layers": len(self.layers),
            "skipped": len(self.skipped),
            "rows": int(sum(l.rows for l in self.layers)),
            "norm_change_mean_pct": float(np.nanmean(col["norm_mean_pct"])),
            "norm_change_std_pct": float(np.nanmean(col["norm_std_pct"])),
            "direction_change_mean_pct": float(np.nanmean(col["dir_mean_pct"])),
            "direction_change_std_pct": float(np.nanmean(col["dir_std_pct"])),
        }
        nm = out["norm_change_mean_pct"]
        out["direction_to_norm_ratio"] = float(out["direction_change_mean_pct"] / nm) if nm > 0 else float("nan")
        energies = [l.svd_energy for l in self.layers if l.svd_energy is not None and not math.isnan(l.svd_energy)]
        if energies:
            out["svd_fraction"] = self.svd_fraction
            out["svd_energy_kept_mean"] = float(np.mean(energies))
        return out

    def per_layer_rows(self) -> list[dict[str, object]]:
        return [{**asdict(l), "shape": "x".join(map(str, l.shape))} for l in self.layers]


def analysable_keys(reference: Mapping[str, torch.Tensor], candidate: Mapping[str, torch.Tensor]
                    ) -> tuple[list[str], dict[str, str]]:
    """Keys of 2D+ floating tensors present in both with equal shapes; and ``{key: reason}`` skipped."""
    keys, skipped = [], {}
    for k in reference:
        if k not in candidate:
            skipped[k] = "missing in candidate"
            continue
        a, b = reference[k], candidate[k]
        if a.ndim < 2 or not a.is_floating_point():
            continue  # biases, norms, buffers: not rows of a weight
        if tuple(a.shape) != tuple(b.shape):
            skipped[k] = f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
            continue
        keys.append(k)
    for k in candidate:
        if k not in reference:
            skipped[k] = "missing in reference"
    return keys, skipped


def compare_weights(reference: Mapping[str, torch.Tensor], candidate: Mapping[str, torch.Tensor],
                    svd_fraction: float | None = 0.3, progress: bool = True) -> WeightComparison:
    """Compare every 2D+ weight shared by the two state dicts; ``svd_fraction=None`` skips the SVD."""
    keys, skipped = analysable_keys(reference, candidate)
    layers, pooled_norm, pooled_dir = [], [], []
    for k in tqdm(keys, desc="weights", disable=not progress, leave=False):
        d_norm, d_dir = row_changes(reference[k], candidate[k])
        pn, pd = (d_norm * 100).numpy(), (d_dir * 100).numpy()
        pooled_norm.append(pn)
        pooled_dir.append(pd)
        energy = residual_svd_energy(reference[k], candidate[k], svd_fraction) if svd_fraction else None
        layers.append(LayerChange(
            name=k, shape=tuple(reference[k].shape), rows=int(reference[k].shape[0]),
            norm_mean_pct=float(np.nanmean(pn)), norm_std_pct=float(np.nanstd(pn)),
            dir_mean_pct=float(np.nanmean(pd)), dir_std_pct=float(np.nanstd(pd)), svd_energy=energy))
    cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0))
    return WeightComparison(layers, cat(pooled_norm), cat(pooled_dir), skipped, svd_fraction or 0.0)


def swap_norm(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per row ``|w_T| * w_S / |w_S|``: the student's directions with the teacher's norms."""
    s, t = _rows(student), _rows(teacher)
    out = s * (t.norm(dim=1, keepdim=True) / s.norm(dim=1, keepdim=True).clamp_min(_EPS))
    return out.reshape(student.shape).to(student.dtype)


def swap_direction(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per row ``|w_S| * w_T / |w_T|``: the teacher's directions with the student's norms."""
    s, t = _rows(student), _rows(teacher)
    out = t * (s.norm(dim=1, keepdim=True) / t.norm(dim=1, keepdim=True).clamp_min(_EPS))
    return out.reshape(student.shape).to(student.dtype)


def swap_state_dict(candidate: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                    what: str, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """``candidate`` with the reference's ``"norm"`` or ``"direction"`` on every shared 2D+ weight
    (or on ``keys``); everything else is the candidate's, dtypes kept."""
    fns = {"norm": swap_norm, "direction": swap_direction}
    if what not in fns:
        raise ValueError(f"swap must be 'norm' or 'direction', got {what!r}")
    keys = list(keys) if keys is not None else analysable_keys(reference, candidate)[0]
    out = dict(candidate)
    for k in keys:
        out[k] = fns[what](candidate[k], reference[k])
    return out
