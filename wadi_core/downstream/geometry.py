"""Reading a generated domain image with the renderer's geometry: where the object is, its
silhouette, colour, size and position, and (for two-object scenes) where each coloured object is.

Domain backgrounds are dark (every channel < 50) and every domain colour has a channel >= 170.
A pixel belongs to an object when its brightest channel is past the midpoint between the image's
background level (median) and its object level (99th percentile): the 50 % coverage contour of
the renderer's anti-aliased silhouette.
"""

from __future__ import annotations

import numpy as np
import torch

from wadi_core.domain.attributes import COLOUR_RGB, COLOURS, POSITIONS
from wadi_core.domain.render import POSITION_CENTRES

__all__ = ["FOREGROUND_LEVEL", "MIN_CONTRAST", "to_uint8", "foreground_mask", "iou", "object_colour", "centroid",
           "position_of", "colour_masks", "RELATIONS", "relation_of", "solidity", "elongation", "components", "layout_axis"]

FOREGROUND_LEVEL = 110  # absolute object/background cut for pixels of a known colour (two-object scenes)
MIN_CONTRAST = 60.0
_RGB = np.asarray([COLOUR_RGB[c] for c in COLOURS], np.float32)


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """float [0, 1] (B,3,H,W) tensor or uint8 (B,H,W,3) array -> uint8 (B,H,W,3)."""
    if isinstance(images, torch.Tensor):
        return (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return np.asarray(images, np.uint8)


def foreground_mask(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """bool (B, H, W): object pixels (see the module doc); empty when nothing in the image is at
    least ``MIN_CONTRAST`` brighter than its background."""
    level = to_uint8(images).max(axis=-1).astype(np.float32)
    flat = level.reshape(len(level), -1)
    background = np.median(flat, axis=1)
    top = np.percentile(flat, 99, axis=1)
    threshold = np.maximum((background + top) / 2, background + MIN_CONTRAST / 2)[:, None, None]
    return (level > threshold) & ((top - background) >= MIN_CONTRAST)[:, None, None]


def iou(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Intersection over union per image of two bool (B, H, W) masks (1.0 when both are empty)."""
    inter = (pred & target).sum(axis=(1, 2))
    union = (pred | target).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _nearest_colour(rgb: np.ndarray) -> np.ndarray:
    return np.argmin(((rgb[..., None, :] - _RGB) ** 2).sum(-1), axis=-1)


def object_colour(images: torch.Tensor | np.ndarray, masks: np.ndarray) -> list[str | None]:
    """The domain colour nearest to the mean foreground colour of each image (None: no foreground)."""
    arr = to_uint8(images).astype(np.float32)
    out: list[str | None] = []
    for img, m in zip(arr, masks):
        out.append(COLOURS[int(_nearest_colour(img[m].mean(0)))] if m.any() else None)
    return out


def centroid(mask: np.ndarray) -> tuple[float, float] | None:
    """(x, y) centre of mass of a bool (H, W) mask in units of the image side (None if empty)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    h, w = mask.shape
    return float((xs.mean() + 0.5) / w), float((ys.mean() + 0.5) / h)


def position_of(mask: np.ndarray) -> str | None:
    """The domain position (left/right/top/bottom) whose centre is nearest the object's centroid."""
    c = centroid(mask)
    if c is None:
        return None
    return min(POSITIONS, key=lambda p: (c[0] - POSITION_CENTRES[p][0]) ** 2 + (c[1] - POSITION_CENTRES[p][1]) ** 2)


def colour_masks(image: torch.Tensor | np.ndarray, colours: list[str], max_distance: float = 110.0) -> list[np.ndarray]:
    """For one image (float (3,H,W) or uint8 (H,W,3)), a bool mask per requested colour: foreground
    pixels whose nearest domain colour is that colour and within ``max_distance`` (RGB) of it."""
    img = to_uint8(image[None] if isinstance(image, torch.Tensor) else np.asarray(image)[None])[0].astype(np.float32)
    fg = img.max(-1) > FOREGROUND_LEVEL
    nearest = _nearest_colour(img)
    dist = np.sqrt(((img - _RGB[nearest]) ** 2).sum(-1))
    return [fg & (nearest == COLOURS.index(c)) & (dist <= max_distance) for c in colours]


#: Spatial relations of a two-object scene: "A <relation> B".
RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of")


def relation_of(first: np.ndarray, second: np.ndarray, min_pixels: int = 4) -> str | None:
    """The relation of object ``first`` to object ``second`` from their centroids (the dominant axis
    of the offset); None when either object is missing (fewer than ``min_pixels`` pixels)."""
    if first.sum() < min_pixels or second.sum() < min_pixels:
        return None
    (x1, y1), (x2, y2) = centroid(first), centroid(second)  # type: ignore[misc]
    dx, dy = x1 - x2, y1 - y2
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "left of" if dx < 0 else "right of"


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2-D points (Andrew's monotone chain + shoelace)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def half(seq: list) -> list:
        out: list = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out

    hull = np.asarray(half(pts)[:-1] + half(pts[::-1])[:-1], np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def solidity(mask: np.ndarray) -> float:
    """Area of a bool (H, W) mask over the area of its convex hull (pixel squares): ~1 for the
    domain's convex shapes, ~0.6 for a five-pointed star; nan for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return float("nan")
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    return float(len(xs) / max(_hull_area(corners), 1.0))


def elongation(mask: np.ndarray) -> float:
    """sqrt of the ratio of the principal second moments of a bool (H, W) mask: ~1 for the domain's
    shapes, ~3 for a 3:1 bar; nan for fewer than 3 pixels."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 3:
        return float("nan")
    ev = np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(np.float64)) + 1e-3 * np.eye(2))
    return float(np.sqrt(ev[1] / ev[0]))


def components(mask: np.ndarray, min_pixels: int = 4) -> list[np.ndarray]:
    """4-connected components of a bool (H, W) mask with at least ``min_pixels`` pixels, largest first."""
    seen = np.zeros_like(mask, bool)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp = np.zeros_like(mask, bool)
        stack = [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp[y, x] = True
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if comp.sum() >= min_pixels:
            out.append(comp)
    return sorted(out, key=lambda c: -int(c.sum()))


def layout_axis(image: torch.Tensor | np.ndarray) -> str | None:
    """"vertical" or "horizontal": how the two largest objects of one image are arranged, whatever
    their colours (None unless there are at least two). Tells a layout from a colour-binding error."""
    img = image[None] if isinstance(image, torch.Tensor) else np.asarray(image)[None]
    comps = components(foreground_mask(img)[0])
    if len(comps) < 2:
        return None
    (x1, y1), (x2, y2) = centroid(comps[0]), centroid(comps[1])  # type: ignore[misc]
    return "vertical" if abs(y1 - y2) >= abs(x1 - x2) else "horizontal"
