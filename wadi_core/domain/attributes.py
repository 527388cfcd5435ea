"""Attributes of the embedded procedural domain, its captions and its train / held-out split.

One object per image: shape x colour x size x position (3 x 6 x 2 x 4 = 144 combinations).
Twelve combinations (``HELDOUT_COMBOS``) never appear in training prompts, so evaluation can
ask for compositions the teacher has not seen.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Iterator

import numpy as np

__all__ = [
    "SHAPES", "COLOURS", "COLOUR_RGB", "SIZES", "POSITIONS", "ATTRIBUTE_NAMES", "ATTRIBUTE_VALUES",
    "Attributes", "ALL_COMBOS", "HELDOUT_COMBOS", "TRAIN_COMBOS", "combos", "sample_attributes",
    "caption", "parse_caption", "find_attributes", "train_prompts", "eval_prompts", "vocabulary",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "white")
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 235),
    "yellow": (235, 215, 40), "purple": (165, 60, 215), "white": (235, 235, 235),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
ATTRIBUTE_NAMES: tuple[str, ...] = ("shape", "colour", "size", "position")
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS,
}
_POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}


@dataclasses.dataclass(frozen=True)
class Attributes:
    """What one domain image shows; every field is one of the values in ``ATTRIBUTE_VALUES``."""

    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for name in ATTRIBUTE_NAMES:
            value = getattr(self, name)
            if value not in ATTRIBUTE_VALUES[name]:
                raise ValueError(f"{name}={value!r} is not one of {ATTRIBUTE_VALUES[name]}")

    def index(self) -> tuple[int, int, int, int]:
        """Class indices per attribute, in ``ATTRIBUTE_NAMES`` order."""
        return tuple(ATTRIBUTE_VALUES[n].index(getattr(self, n)) for n in ATTRIBUTE_NAMES)  # type: ignore[return-value]


def combos() -> list[Attributes]:
    """All 144 attribute combinations in a fixed order."""
    return [Attributes(*c) for c in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS)]


def _is_heldout(a: Attributes) -> bool:
    # A fixed arithmetic rule picks 12 of 144 combinations, spread so that every single
    # attribute value (and most pairs) still occurs in training.
    s, c, z, p = a.index()
    return (s + c + z + 2 * p) % 12 == 4


ALL_COMBOS: tuple[Attributes, ...] = tuple(combos())
HELDOUT_COMBOS: tuple[Attributes, ...] = tuple(a for a in ALL_COMBOS if _is_heldout(a))
TRAIN_COMBOS: tuple[Attributes, ...] = tuple(a for a in ALL_COMBOS if not _is_heldout(a))
_SPLITS = {"train": TRAIN_COMBOS, "heldout": HELDOUT_COMBOS, "all": ALL_COMBOS}


def _split(split: str) -> tuple[Attributes, ...]:
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {sorted(_SPLITS)}")
    return _SPLITS[split]


def sample_attributes(rng: np.random.Generator, split: str = "train") -> Attributes:
    """Draw one combination uniformly from ``split`` ("train", "heldout" or "all")."""
    pool = _split(split)
    return pool[int(rng.integers(len(pool)))]


def caption(attrs: Attributes) -> str:
    """The canonical caption, e.g. "a large red circle on the left"."""
    return f"a {attrs.size} {attrs.colour} {attrs.shape} {_POSITION_PHRASE[attrs.position]}"


_WORD = re.compile(r"[a-z]+")


def find_attributes(text: str) -> dict[str, str]:
    """The attributes a free-form text mentions (first match per attribute); may be partial."""
    found: dict[str, str] = {}
    for word in _WORD.findall(text.lower()):
        for name in ATTRIBUTE_NAMES:
            if name not in found and word in ATTRIBUTE_VALUES[name]:
                found[name] = word
    return found


def parse_caption(text: str) -> Attributes:
    """Inverse of ``caption``; accepts any text naming all four attributes."""
    found = find_attributes(text)
    missing = [n for n in ATTRIBUTE_NAMES if n not in found]
    if missing:
        raise ValueError(f"caption {text!r} does not name the {', '.join(missing)}: "
                         f"expected something like {caption(ALL_COMBOS[0])!r}")
    return Attributes(**found)


def train_prompts(seed: int) -> Iterator[str]:
    """Infinite, seeded stream of training captions (held-out combinations excluded)."""
    rng = np.random.default_rng(seed)
    while True:
        yield caption(sample_attributes(rng, "train"))


def eval_prompts(n: int, seed: int = 0, split: str = "train") -> list[str]:
    """``n`` evaluation captions, balanced over the combinations of ``split``, shuffled by ``seed``.

    "train" means combinations seen in training (the images are new), "heldout" the 12
    combinations never seen in training, "all" every combination.
    """
    pool = _split(split)
    rng = np.random.default_rng(seed)
    reps = -(-n // len(pool))
    order = np.concatenate([rng.permutation(len(pool)) for _ in range(reps)])[:n]
    return [caption(pool[i]) for i in order]


def vocabulary() -> list[str]:
    """Every word a domain caption can contain (for building the tokenizer)."""
    words = set()
    for a in ALL_COMBOS:
        words.update(caption(a).split())
    return sorted(words)
