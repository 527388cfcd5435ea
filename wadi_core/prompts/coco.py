"""Evaluation prompts in COCO captions JSON (the ``captions_val2014.json`` schema).

Writing our domain's evaluation prompts in this schema lets the evaluation path read the toy
set and the real COCO files the same way.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

from wadi_core import storage

__all__ = ["CocoCaption", "coco_captions_json", "write_coco_captions", "read_coco_captions"]


@dataclasses.dataclass(frozen=True)
class CocoCaption:
    image_id: int
    caption_id: int
    caption: str
    file_name: str
    height: int
    width: int


def coco_captions_json(prompts: Sequence[str], height: int = 32, width: int = 32,
                       description: str = "WaDi embedded-domain evaluation prompts") -> dict[str, Any]:
    """One image per prompt: image ids 1..N, annotation ids 1..N, file names ``{id:012d}.png``."""
    images = [{"id": i, "file_name": f"{i:012d}.png", "height": height, "width": width, "license": 0,
               "coco_url": "", "flickr_url": "", "date_captured": ""} for i in range(1, len(prompts) + 1)]
    annotations = [{"image_id": i, "id": i, "caption": p} for i, p in enumerate(prompts, start=1)]
    return {
        "info": {"description": description, "version": "1.0", "year": 2026, "contributor": "wadi",
                 "url": "", "date_created": ""},
        "licenses": [{"id": 0, "name": "generated", "url": ""}],
        "images": images,
        "annotations": annotations,
    }


def write_coco_captions(prompts: Sequence[str], uri: str, height: int = 32, width: int = 32, **kw: Any) -> None:
    """Write ``prompts`` as a COCO captions JSON file at ``uri`` (local path or s3://)."""
    storage.write_bytes(uri, json.dumps(coco_captions_json(prompts, height, width, **kw)).encode("utf-8"))


def read_coco_captions(uri: str, first_per_image: bool = False) -> list[CocoCaption]:
    """Captions of a COCO captions JSON (ours or the real ``captions_val2014.json``), by annotation id.

    ``first_per_image`` keeps the lowest-id caption of each image (real COCO has ~5 per image).
    """
    data = json.loads(storage.read_bytes(uri))
    for key in ("images", "annotations"):
        if key not in data:
            raise ValueError(f"{uri} is not a COCO captions file: it has no {key!r} list")
    images = {img["id"]: img for img in data["images"]}
    out: list[CocoCaption] = []
    seen: set[int] = set()
    for ann in sorted(data["annotations"], key=lambda a: a["id"]):
        if first_per_image and ann["image_id"] in seen:
            continue
        seen.add(ann["image_id"])
        img = images.get(ann["image_id"])
        if img is None:
            raise ValueError(f"{uri}: annotation {ann['id']} refers to a missing image {ann['image_id']}")
        out.append(CocoCaption(ann["image_id"], ann["id"], ann["caption"].strip(), img["file_name"],
                               int(img["height"]), int(img["width"])))
    return out
