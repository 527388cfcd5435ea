"""PNG plots of a weight comparison (matplotlib's Agg canvas; no pyplot global state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .weights import WeightComparison

__all__ = ["plot_layer_scatter", "plot_histograms", "plot_svd_energy", "layer_category"]

_CATEGORIES = (("attn", "attention"), ("ff.", "feed-forward"), ("conv", "conv"), ("proj", "projection"))


def layer_category(name: str) -> str:
    """Coarse type of a weight from its key (for colours)."""
    for needle, label in _CATEGORIES:
        if needle in name:
            return label
    return "other"


def _figure(w: float = 6.0, h: float = 4.5):
    from matplotlib.figure import Figure  # noqa: PLC0415 -- matplotlib only for a figure (slow import)

    return Figure(figsize=(w, h), dpi=120, layout="constrained")


def plot_layer_scatter(cmp: WeightComparison, path: str | Path, title: str = "") -> Path:
    """Per-layer mean direction change vs mean norm change (like the paper's Fig. 1a)."""
    fig = _figure()
    ax = fig.add_subplot()
    cats = np.array([layer_category(l.name) for l in cmp.layers])
    x = np.array([l.norm_mean_pct for l in cmp.layers])
    y = np.array([l.dir_mean_pct for l in cmp.layers])
    for c in sorted(set(cats)):
        m = cats == c
        ax.scatter(x[m], y[m], s=10, alpha=0.7, label=f"{c} ({m.sum()})")
    hi = float(np.nanmax(np.concatenate([x, y]))) if len(x) else 1.0
    ax.plot([0, hi], [0, hi], "k--", lw=0.8, label="equal change")
    ax.set_xlabel("norm change, mean over rows (%)")
    ax.set_ylabel("direction change 1 - cos, mean over rows (%)")
    s = cmp.summary()
    ax.set_title(title or f"per layer: direction {s['direction_change_mean_pct']:.3g}% vs "
                          f"norm {s['norm_change_mean_pct']:.3g}%")
    ax.legend(fontsize=7)
    fig.savefig(path)
    return Path(path)


def plot_histograms(cmp: WeightComparison, path: str | Path) -> Path:
    """Histograms of the per-row changes (all layers pooled) and of the per-layer means."""
    fig = _figure(10, 7)
    axes = fig.subplots(2, 2)
    panels = [
        (cmp.row_norm_pct, "per-row norm change (%)"),
        (cmp.row_dir_pct, "per-row direction change (%)"),
        (np.array([l.norm_mean_pct for l in cmp.layers]), "per-layer mean norm change (%)"),
        (np.array([l.dir_mean_pct for l in cmp.layers]), "per-layer mean direction change (%)"),
    ]
    for ax, (vals, label) in zip(axes.flat, panels):
        vals = vals[np.isfinite(vals)]
        ax.hist(vals, bins=60, color="tab:blue" if "norm" in label else "tab:orange")
        ax.set_xlabel(label)
        ax.set_ylabel("count")
        if len(vals) > 1000:
            ax.set_yscale("log")
    fig.savefig(path)
    return Path(path)


def plot_svd_energy(cmp: WeightComparison, path: str | Path) -> Path | None:
    """Histogram of the residual energy kept at the chosen rank fraction (None without SVD)."""
    vals = np.array([l.svd_energy for l in cmp.layers if l.svd_energy is not None], dtype=float)
    vals = vals[np.isfinite(vals)]
    if not len(vals):
        return None
    fig = _figure()
    ax = fig.add_subplot()
    ax.hist(vals * 100, bins=40, color="tab:green")
    ax.set_xlabel(f"energy of V_S - V_T kept by {cmp.svd_fraction:.0%} of the rank (%)")
    ax.set_ylabel("layers")
    ax.set_title(f"mean {vals.mean():.1%}")
    fig.savefig(path)
    return Path(path)
