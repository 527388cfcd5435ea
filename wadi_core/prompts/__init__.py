"""Prompt lakes: JourneyDB / domain prompts as WebDataset shards, evaluation prompts as COCO captions JSON."""

from wadi_core.prompts.coco import CocoCaption, coco_captions_json, read_coco_captions, write_coco_captions
from wadi_core.prompts.journeydb import (JOURNEYDB_SEED, JourneyDBStats, dedupe_sort_shuffle, extract_caption,
                                         iter_annotation_lines, iter_journeydb_captions)
from wadi_core.prompts.lake import EmbeddedLake, domain_to_shards, ensure_embedded_lake, journeydb_to_shards
from wadi_core.prompts.shards import MANIFEST, read_manifest, read_prompt_shards, write_prompt_shards

__all__ = [
    "CocoCaption", "coco_captions_json", "read_coco_captions", "write_coco_captions", "JOURNEYDB_SEED",
    "JourneyDBStats", "dedupe_sort_shuffle", "extract_caption", "iter_annotation_lines", "iter_journeydb_captions",
    "EmbeddedLake", "domain_to_shards", "ensure_embedded_lake", "journeydb_to_shards", "MANIFEST", "read_manifest",
    "read_prompt_shards", "write_prompt_shards",
]
