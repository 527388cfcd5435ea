"""The whole analysis of two checkpoints: numbers, CSV, plots and an optional swapped checkpoint."""

from __future__ import annotations

import csv
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import storage
from .checkpoint import load_weights, locate_weights, save_weights_like
from .plots import plot_histograms, plot_layer_scatter, plot_svd_energy
from .weights import compare_weights, swap_state_dict

__all__ = ["AnalyzeWeightsConfig", "analyze_checkpoints"]


@dataclass(frozen=True)
class AnalyzeWeightsConfig:
    """``reference`` is the teacher (w), ``candidate`` the student (w'); URIs local or s3://."""

    reference: str                   # reference checkpoint w (the teacher): model dir, pipeline dir or .safetensors
    candidate: str                   # checkpoint w' compared with w row by row (the student), same forms
    out: str                         # dir of summary.json, per_layer.csv and the PNGs (local or s3://)
    swap: str | None = None          # "norm": candidate gets the reference's norms; "direction": its directions
    swap_out: str | None = None      # default: <out>/swapped_<swap>[.safetensors]
    svd_fraction: float | None = 0.3  # None: skip the residual SVD
    plots: bool = True               # write layer_scatter.png, histograms.png, svd_energy.png
    cache_dir: str | None = None     # local mirror of s3:// checkpoints (None: $WADI_CACHE, else ~/.cache/wadi)

    def __post_init__(self) -> None:
        if self.swap not in (None, "norm", "direction"):
            raise ValueError(f"swap must be 'norm' or 'direction', got {self.swap!r}")
        if self.svd_fraction is not None and not 0 < self.svd_fraction <= 1:
            raise ValueError(f"svd_fraction must be in (0, 1], got {self.svd_fraction}")


def analyze_checkpoints(cfg: AnalyzeWeightsConfig, progress: bool = True,
                        on_written: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Run the analysis; write summary.json, per_layer.csv, PNGs (and the swap) under ``cfg.out``.

    ``on_written(local_dir)`` is called with the local copy of the outputs (e.g. to log them as
    artifacts) before a remote ``out`` is uploaded. Returns the summary dict (with ``outputs``:
    written file names, ``swap_out``: where the swap went).
    """
    ref_ckpt = locate_weights(storage.materialize(cfg.reference, cfg.cache_dir))
    cand_ckpt = locate_weights(storage.materialize(cfg.candidate, cfg.cache_dir))
    reference, candidate = load_weights(ref_ckpt), load_weights(cand_ckpt)
    cmp = compare_weights(reference, candidate, svd_fraction=cfg.svd_fraction, progress=progress)
    summary: dict[str, Any] = dict(cmp.summary())
    summary.update(reference=cfg.reference, candidate=cfg.candidate)
    if cmp.skipped:
        summary["skipped_examples"] = dict(list(cmp.skipped.items())[:10])

    with tempfile.TemporaryDirectory() as tmp:
        local_out = Path(tmp) / "out" if storage.is_remote(cfg.out) else Path(cfg.out)
        local_out.mkdir(parents=True, exist_ok=True)
        outputs = ["summary.json", "per_layer.csv"]
        rows = cmp.per_layer_rows()
        with open(local_out / "per_layer.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        if cfg.plots:
            plot_layer_scatter(cmp, local_out / "layer_scatter.png")
            plot_histograms(cmp, local_out / "histograms.png")
            outputs += ["layer_scatter.png", "histograms.png"]
            if plot_svd_energy(cmp, local_out / "svd_energy.png") is not None:
                outputs.append("svd_energy.png")
        if cfg.swap:
            swapped = swap_state_dict(candidate, reference, cfg.swap)
            suffix = ".safetensors" if cand_ckpt.is_file else ""
            dest = cfg.swap_out or storage.join(cfg.out, f"swapped_{cfg.swap}{suffix}")
            summary["swap"], summary["swap_out"] = cfg.swap, dest
            local_dest = Path(tmp) / "swap" / Path(dest).name if storage.is_remote(dest) else Path(dest)
            save_weights_like(cand_ckpt, swapped, local_dest)
            if storage.is_remote(dest):
                if cand_ckpt.is_file:
                    storage.write_bytes(dest, local_dest.read_bytes())
                else:
                    storage.upload_dir(local_dest, dest)
        summary["outputs"] = outputs
        (local_out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        if on_written is not None:
            on_written(local_out)
        if storage.is_remote(cfg.out):
            storage.upload_dir(local_out, cfg.out)
    return summary
