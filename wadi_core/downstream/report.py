"""Scores and pictures shared by the downstream jobs: domain alignment + FID of generated images,
a labelled comparison grid, and a markdown table."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from PIL import Image, ImageDraw

from wadi_core.domain.quality import alignment_report
from wadi_core.images import image_grid

__all__ = ["domain_scores", "labelled_grid", "markdown_table"]


@torch.no_grad()
def domain_scores(images: torch.Tensor, prompts: list[str], evaluator: Any, real_stats: Any | None) -> dict[str, float]:
    """Per-attribute accuracy / alignment (domain evaluator heads) and, with ``real_stats``, the domain
    FID (evaluator features) of float [0, 1] images against real renders."""
    from wadi_core.metrics import (GaussianStats,  # noqa: PLC0415 -- loads scipy (slow), only needed here
                                   frechet_distance)

    out = alignment_report(evaluator, images, prompts)
    if real_stats is not None:
        feats = torch.cat([evaluator.features(images[i:i + 500]) for i in range(0, len(images), 500)])
        out["fid"] = float(frechet_distance(GaussianStats.from_features(feats.double().numpy()), real_stats))
    return out


def labelled_grid(columns: Sequence[torch.Tensor], labels: Sequence[str], scale: int = 4,
                  row_labels: Sequence[str] = ()):
    """PIL image: one column per tensor (B, 3, H, W) in [0, 1] (row i = item i), a header with the
    column labels and optional row labels on the left."""
    n = columns[0].shape[0]
    tiles = torch.stack([c[:n].float() for c in columns], dim=1).flatten(0, 1)  # (n * ncol, 3, H, W)
    grid = image_grid(tiles, rows=n, scale=scale)
    tile_w = grid.width // len(columns)
    left = 8 + 6 * max((len(r) for r in row_labels), default=0)
    canvas = Image.new("RGB", (grid.width + left, grid.height + 28), "white")
    canvas.paste(grid, (left, 28))
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(labels):
        draw.text((left + j * tile_w + 3, 8), label[: max(4, tile_w // 6)], fill="black")
    tile_h = grid.height // n
    for i, label in enumerate(row_labels):
        draw.text((4, 28 + i * tile_h + tile_h // 2 - 5), label, fill="black")
    return canvas


def markdown_table(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str], digits: int = 3) -> str:
    """``| model | col ... |`` with one row per entry of ``rows`` (missing values as '-')."""
    head = "| model | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    body = ""
    for name, vals in rows.items():
        cells = [f"{vals[c]:.{digits}f}" if c in vals else "-" for c in columns]
        body += f"| {name} | " + " | ".join(cells) + " |\n"
    return head + body
