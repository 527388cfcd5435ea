"""Renders outside the single-object domain, drawn exactly like the domain's renders (same
jitter, colours, background, anti-aliasing): new subject shapes for DreamBooth (a flat bar, 3:1,
and a five-pointed star, neither of which the teacher has seen; the embedded VAE reproduces the
bar but turns the star's points into a pentagon) and two-object scenes in a spatial relation for ReVersion.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from wadi_core.domain.attributes import COLOUR_RGB, COLOURS, POSITIONS, SIZES
from wadi_core.domain.render import POSITION_CENTRES, SIZE_RADII, SUPERSAMPLE, shape_mask

__all__ = ["SUBJECT_SHAPES", "render_subject", "subject_caption", "Scene", "render_scene", "scene_caption",
           "sample_scene"]

SUBJECT_SHAPES: tuple[str, ...] = ("bar", "star")
_POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}


def _star_mask(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float, points: int = 5) -> np.ndarray:
    """Inside a ``points``-pointed star (outer radius r, inner 0.45 r, one point up): even-odd rule."""
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, r, 0.45 * r)
    vx, vy = cx + radii * np.cos(angles), cy + radii * np.sin(angles)
    inside = np.zeros(xx.shape, bool)
    for i in range(2 * points):
        x1, y1, x2, y2 = vx[i], vy[i], vx[(i + 1) % (2 * points)], vy[(i + 1) % (2 * points)]
        crosses = (y1 > yy) != (y2 > yy)
        x_at = x1 + (yy - y1) * (x2 - x1) / (y2 - y1 + 1e-12)
        inside ^= crosses & (xx < x_at)
    return inside


def _mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    if shape == "star":  # finer than the embedded VAE resolves: its points come back as a pentagon
        return _star_mask(xx, yy, cx, cy, r * 1.15)
    if shape == "bar":  # a flat horizontal bar
        return (np.abs(xx - cx) <= 1.2 * r) & (np.abs(yy - cy) <= 0.4 * r)
    return shape_mask(shape, xx, yy, cx, cy, r)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    n = size * SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / n
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    return xx, yy


def _coverage(fine: np.ndarray, size: int) -> np.ndarray:
    return fine.astype(np.float32).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def render_subject(shape: str, colour: str, size_name: str, position: str, seed: int,
                   size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """One object of any domain shape or ``star`` with the domain's jitter; (uint8 (H,W,3), coverage (H,W))."""
    if colour not in COLOURS or size_name not in SIZES or position not in POSITIONS:
        raise ValueError(f"unknown colour/size/position {colour!r}/{size_name!r}/{position!r}")
    rng = np.random.default_rng(seed)
    cx, cy = POSITION_CENTRES[position]
    cx += rng.uniform(-0.06, 0.06)
    cy += rng.uniform(-0.06, 0.06)
    r = SIZE_RADII[size_name] * rng.uniform(0.9, 1.1)
    rgb = np.clip(np.asarray(COLOUR_RGB[colour], np.float32) + rng.uniform(-18, 18, 3), 0, 255)
    background = rng.uniform(0, 50, 3).astype(np.float32)
    xx, yy = _grid(size)
    cov = _coverage(_mask(shape, xx, yy, cx, cy, r), size)
    img = background * (1 - cov[..., None]) + rgb * cov[..., None]
    return np.round(img).clip(0, 255).astype(np.uint8), cov


def subject_caption(token: str, colour: str, size_name: str, position: str) -> str:
    """A domain caption with the shape word replaced by ``token``: "a small blue sks at the top"."""
    return f"a {size_name} {colour} {token} {_POSITION_PHRASE[position]}"


# ----------------------------------------------------------------------------- two-object scenes
@dataclasses.dataclass(frozen=True)
class Scene:
    """"a <colour_a> <shape_a> <relation> a <colour_b> <shape_b>" (relation in geometry.RELATIONS)."""

    shape_a: str
    colour_a: str
    relation: str
    shape_b: str
    colour_b: str


_OFFSET = {"above": (0.0, -1.0), "below": (0.0, 1.0), "left of": (-1.0, 0.0), "right of": (1.0, 0.0)}


def scene_caption(scene: Scene, relation_word: str | None = None) -> str:
    """The caption; ``relation_word`` replaces the relation (e.g. a learned token)."""
    rel = relation_word if relation_word is not None else scene.relation
    return f"a {scene.colour_a} {scene.shape_a} {rel} a {scene.colour_b} {scene.shape_b}"


def sample_scene(rng: np.random.Generator, relations: tuple[str, ...] = tuple(_OFFSET),
                 shapes: tuple[str, ...] = ("circle", "square", "triangle")) -> Scene:
    """Two objects of different colours in a random relation."""
    ca, cb = rng.choice(len(COLOURS), 2, replace=False)
    return Scene(shapes[rng.integers(len(shapes))], COLOURS[ca], relations[rng.integers(len(relations))],
                 shapes[rng.integers(len(shapes))], COLOURS[cb])


def render_scene(scene: Scene, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two small objects, A placed in ``scene.relation`` to B around a jittered centre;
    (uint8 (H,W,3), coverage of A, coverage of B). A is drawn over B where they touch."""
    if scene.relation not in _OFFSET:
        raise ValueError(f"unknown relation {scene.relation!r}: use one of {list(_OFFSET)}")
    rng = np.random.default_rng(seed)
    ox, oy = _OFFSET[scene.relation]
    mx, my = 0.5 + rng.uniform(-0.08, 0.08), 0.5 + rng.uniform(-0.08, 0.08)
    gap = rng.uniform(0.20, 0.26)  # half the centre distance: objects never overlap at radius 0.14
    # Jitter across the relation axis too, but less than along it, so the relation stays unambiguous.
    side = rng.uniform(-0.06, 0.06)
    ax, ay = mx + ox * gap + oy * side, my + oy * gap + ox * side
    bx, by = mx - ox * gap - oy * side, my - oy * gap - ox * side
    ra, rb = (SIZE_RADII["small"] * rng.uniform(0.85, 1.1) for _ in range(2))
    rgb_a, rgb_b = (np.clip(np.asarray(COLOUR_RGB[c], np.float32) + rng.uniform(-18, 18, 3), 0, 255)
                    for c in (scene.colour_a, scene.colour_b))
    background = rng.uniform(0, 50, 3).astype(np.float32)
    xx, yy = _grid(size)
    cov_a = _coverage(_mask(scene.shape_a, xx, yy, ax, ay, ra), size)
    cov_b = _coverage(_mask(scene.shape_b, xx, yy, bx, by, rb), size) * (1 - cov_a)
    img = background * (1 - cov_a - cov_b)[..., None] + rgb_a * cov_a[..., None] + rgb_b * cov_b[..., None]
    return np.round(img).clip(0, 255).astype(np.uint8), cov_a, cov_b
