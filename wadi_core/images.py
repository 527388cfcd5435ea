"""The one image-grid helper: samples, comparisons and reports all go through ``image_grid``.

Tiles are assembled by diffusers' ``make_image_grid``; small tiles (the embedded domain's 32 px) are
enlarged with nearest-neighbour to about ``min_tile`` pixels so a grid is readable in MLflow and docs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = ["grid_scale", "image_grid", "save_image_grid", "to_pil", "labelled_panels"]

Images = Union[Tensor, Sequence["PILImage.Image"]]


def grid_scale(tile: int, min_tile: int = 128) -> int:
    """Integer upscale that brings a ``tile``-pixel image to about ``min_tile`` px (1 for large tiles)."""
    return max(1, round(min_tile / max(1, tile)))


def to_pil(images: Images) -> list["PILImage.Image"]:
    """(B, 3, H, W) floats in [0, 1] (or PIL images) -> RGB PIL images."""
    if isinstance(images, Tensor):
        arr = (images.detach().float().clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
        return [Image.fromarray(a) for a in arr]
    return [im.convert("RGB") for im in images]


def image_grid(images: Images, rows: int | None = None, cols: int | None = None, *,
               scale: int | None = None, min_tile: int = 128) -> "PILImage.Image":
    """A PIL grid of ``images`` filled row by row (``rows`` or ``cols``, default up to 8 columns);
    a last row that is not full is padded with white; tiles upscaled ``scale`` x (default:
    ``grid_scale(tile, min_tile)``)."""
    from diffusers.utils import make_image_grid  # noqa: PLC0415 -- diffusers models: seconds to import

    tiles = to_pil(images)
    if not tiles:
        raise ValueError("image_grid needs at least one image")
    n = len(tiles)
    if cols is None:
        cols = -(-n // rows) if rows else min(8, n)
    rows = -(-n // cols)
    w, h = tiles[0].size
    tiles += [Image.new("RGB", (w, h), (255, 255, 255))] * (rows * cols - n)
    grid = make_image_grid([t if t.size == (w, h) else t.resize((w, h)) for t in tiles], rows, cols)
    scale = grid_scale(min(w, h), min_tile) if scale is None else scale
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    return grid


def save_image_grid(rows: Sequence[Tensor], path: str | Path, scale: int | None = None) -> Path:
    """Image batches (each (B, 3, H, W) in [0, 1]) as the rows of a PNG grid; see ``image_grid``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(torch.cat(list(rows)), rows=len(rows), cols=rows[0].shape[0], scale=scale).save(path)
    return path


def labelled_panels(panels: Sequence[tuple[str, "PILImage.Image"]], gap: int = 8) -> "PILImage.Image":
    """Images side by side, each under a caption strip that says what it is (``(label, image)``)."""
    try:
        font = ImageFont.load_default(size=18)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    strip = 30
    width = sum(im.width for _, im in panels) + gap * (len(panels) - 1)
    canvas = Image.new("RGB", (width, strip + max(im.height for _, im in panels)), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for label, im in panels:
        draw.text((x + 6, 6), label, fill="black", font=font)
        canvas.paste(im.convert("RGB"), (x, strip))
        x += im.width + gap
    return canvas
