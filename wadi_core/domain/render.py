"""Deterministic, anti-aliased rendering of domain images (numpy only)."""

from __future__ import annotations

import numpy as np

from wadi_core.domain.attributes import COLOUR_RGB, Attributes

__all__ = ["render", "render_with_mask", "render_batch", "shape_mask", "POSITION_CENTRES", "SIZE_RADII", "SUPERSAMPLE"]

SUPERSAMPLE = 4  # pixels per side of a rendered pixel, averaged into anti-aliased coverage
# Centres and radii in units of the image side.
POSITION_CENTRES = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72)}
SIZE_RADII = {"small": 0.14, "large": 0.25}


def shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean mask of ``shape`` centred at (cx, cy) with radius ``r`` on the grid ``xx``, ``yy``."""
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = 0.86 * r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":
        # Upward triangle with apex (0, -r) and base corners (+-0.98r, 0.8r).
        top, base, half = -r, 0.8 * r, 0.98 * r
        within_y = (dy >= top) & (dy <= base)
        frac = (dy - top) / (base - top)
        return within_y & (np.abs(dx) <= half * frac)
    raise ValueError(f"unknown shape {shape!r}")


def render_with_mask(attrs: Attributes, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Render ``attrs`` with jitter drawn from ``seed``; returns (uint8 (H,W,3), float32 coverage (H,W))."""
    rng = np.random.default_rng(seed)
    cx, cy = POSITION_CENTRES[attrs.position]
    cx += rng.uniform(-0.06, 0.06)
    cy += rng.uniform(-0.06, 0.06)
    r = SIZE_RADII[attrs.size] * rng.uniform(0.9, 1.1)
    colour = np.clip(np.asarray(COLOUR_RGB[attrs.colour], np.float32) + rng.uniform(-18, 18, 3), 0, 255)
    background = rng.uniform(0, 50, 3).astype(np.float32)
    n = size * SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    fine = shape_mask(attrs.shape, xx, yy, cx * 1.0, cy * 1.0, r).astype(np.float32)
    coverage = fine.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
    img = background[None, None, :] * (1 - coverage[..., None]) + colour[None, None, :] * coverage[..., None]
    return np.round(img).clip(0, 255).astype(np.uint8), coverage


def render(attrs: Attributes, seed: int, size: int = 32) -> np.ndarray:
    """Render one image (uint8, (H, W, 3)); the same ``(attrs, seed, size)`` gives the same pixels."""
    return render_with_mask(attrs, seed, size)[0]


def render_batch(attrs: list[Attributes], seeds: list[int], size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Render many images; returns (uint8 (B,H,W,3), float32 coverage masks (B,H,W))."""
    imgs, masks = zip(*(render_with_mask(a, s, size) for a, s in zip(attrs, seeds)))
    return np.stack(imgs), np.stack(masks)
