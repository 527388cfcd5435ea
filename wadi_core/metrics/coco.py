"""COCO evaluation prompt lists: the canonical COCO-30k file and our own seeded draw.

Protocol in docs/EVALUATION.md. The canonical COCO-30k list (GigaGAN / DMD2) is
``coco2014_val_30k_captions.txt`` (found by :func:`default_coco30k_path`); its recipe is not public, so any list we
draw ourselves uses :func:`draw_coco_captions` and is stored with its sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from wadi_core import storage

__all__ = [
    "COCO30K_SHA256",
    "COCO30K_RELATIVE_PATH",
    "CocoPrompt",
    "default_coco30k_path",
    "prompt_list_sha256",
    "read_prompt_list",
    "write_prompt_list",
    "draw_coco_captions",
]

COCO30K_SHA256 = "edabd2a556026cbf5d36a5fffa35ad43d7ba71b72f6d640b727c1edefb7f1945"
#: Where the list is when $WADI_COCO30K is not set: shipped in the repository (COCO captions, CC BY 4.0).
COCO30K_RELATIVE_PATH = "data/prompts/coco2014_val_30k_captions.txt"
DRAW_SEED = 2024


@dataclass(frozen=True)
class CocoPrompt:
    image_id: int
    file_name: str
    caption: str


def default_coco30k_path() -> Path:
    """``$WADI_COCO30K``, else the list shipped in ``data/prompts/`` (its sha256 is checked on
    every read; another list goes in with ``--prompts``). Nothing outside the repository is read."""
    if os.environ.get("WADI_COCO30K"):
        return Path(os.environ["WADI_COCO30K"]).expanduser().resolve()
    repo = Path(__file__).resolve().parents[2]
    return (repo / COCO30K_RELATIVE_PATH).resolve()


def _normalise(caption: str) -> str:
    # COCO captions contain newlines, tabs and trailing spaces: one line per prompt
    return " ".join(caption.split())


def prompt_list_sha256(prompts: Iterable[str]) -> str:
    """sha256 of the prompts as a text file: one per line, UTF-8, trailing newline."""
    return hashlib.sha256(("\n".join(prompts) + "\n").encode("utf-8")).hexdigest()


def read_prompt_list(uri: str | os.PathLike, expected_sha256: str | None = None) -> list[str]:
    """One prompt per line; checks the file's sha256 when given."""
    data = storage.read_bytes(uri)
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 and digest != expected_sha256:
        raise ValueError(f"prompt list {uri} has sha256 {digest}, expected {expected_sha256}: "
                         "the list changed, so its metrics are not comparable")
    return data.decode("utf-8").rstrip("\n").split("\n")


def write_prompt_list(prompts: list[str], uri: str | os.PathLike) -> str:
    """Write one prompt per line; returns the sha256 (equal to :func:`prompt_list_sha256`)."""
    if any("\n" in p for p in prompts):
        raise ValueError("prompts must not contain newlines")
    data = ("\n".join(prompts) + "\n").encode("utf-8")
    storage.write_bytes(uri, data)
    return hashlib.sha256(data).hexdigest()


def draw_coco_captions(captions_json: str | os.PathLike, n: int | None = None, seed: int = DRAW_SEED
                       ) -> list[CocoPrompt]:
    """One caption per image from a COCO ``captions_val201x.json``, drawn with a fixed seed.

    Recipe: images sorted by id; each image's captions sorted by annotation id and
    whitespace-normalised; ``rng = np.random.default_rng(seed)``; one caption index per image
    with ``rng.integers(count)`` in image-id order; then, if ``n`` is smaller than the number of
    images, ``rng.choice(num_images, n, replace=False)`` images, kept in image-id order.
    """
    doc = json.loads(storage.read_bytes(captions_json))
    files = {int(im["id"]): im.get("file_name", "") for im in doc["images"]}
    by_image: dict[int, list[tuple[int, str]]] = {}
    for ann in doc["annotations"]:
        by_image.setdefault(int(ann["image_id"]), []).append((int(ann["id"]), _normalise(ann["caption"])))
    image_ids = sorted(i for i in files if i in by_image)
    if not image_ids:
        raise ValueError(f"{captions_json} has no images with captions")
    rng = np.random.default_rng(seed)
    drawn = []
    for image_id in image_ids:
        caps = sorted(by_image[image_id])
        drawn.append(CocoPrompt(image_id, files[image_id], caps[int(rng.integers(len(caps)))][1]))
    if n is not None:
        if n > len(drawn):
            raise ValueError(f"asked for {n} prompts but {captions_json} has {len(drawn)} captioned images")
        if n < len(drawn):
            keep = np.sort(rng.choice(len(drawn), size=n, replace=False))
            drawn = [drawn[i] for i in keep]
    return drawn
