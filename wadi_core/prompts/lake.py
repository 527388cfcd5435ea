"""Prompt lakes: JourneyDB annotations or the embedded domain -> WebDataset shards + COCO-format eval JSON.

The small embedded lake is generated on first use (about a second) into a cache directory,
not shipped: ``ensure_embedded_lake()``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from wadi_core import storage
from wadi_core.domain.attributes import caption, eval_prompts, sample_attributes
from wadi_core.prompts.coco import write_coco_captions
from wadi_core.prompts.journeydb import JOURNEYDB_SEED, JourneyDBStats, dedupe_sort_shuffle, iter_journeydb_captions
from wadi_core.prompts.shards import write_prompt_shards

__all__ = ["journeydb_to_shards", "domain_to_shards", "EmbeddedLake", "ensure_embedded_lake", "LAKE_VERSION"]

LAKE_VERSION = "v1"


def journeydb_to_shards(annotation_uris: Iterable[str], out_uri: str, shard_size: int = 10_000,
                        seed: int = JOURNEYDB_SEED, progress: bool = False) -> dict[str, Any]:
    """JourneyDB Task2 captions -> deduped, sorted, seed-shuffled prompt shards; returns the manifest."""
    uris = [str(u) for u in annotation_uris]
    if not uris:
        raise ValueError("no JourneyDB annotation files given (expected train_anno*.jsonl or .jsonl.tgz)")
    stats = JourneyDBStats()
    captions = dedupe_sort_shuffle(iter_journeydb_captions(uris, stats), stats, seed)
    samples = ((f"{i:09d}", text, {"source": "journeydb", "index": i}) for i, text in enumerate(captions))
    extra = {"source": "journeydb", "inputs": [Path(u).name for u in uris], "shuffle_seed": seed, **stats.as_dict()}
    return write_prompt_shards(samples, out_uri, shard_size, prefix="journeydb", manifest_extra=extra,
                               progress=progress)


def _domain_samples(n: int, seed: int, split: str) -> Iterator[tuple[str, str, dict[str, Any]]]:

    rng = np.random.default_rng(seed)
    for i in range(n):
        attrs = sample_attributes(rng, split)
        yield f"{i:09d}", caption(attrs), {"source": "domain", "index": i, "split": split,
                                           "attributes": dataclasses.asdict(attrs)}


def domain_to_shards(n: int, out_uri: str, seed: int = 0, split: str = "train",
                     shard_size: int = 10_000) -> dict[str, Any]:
    """``n`` domain training captions (seeded) -> prompt shards; returns the manifest."""
    extra = {"source": "domain", "seed": seed, "split": split}
    return write_prompt_shards(_domain_samples(n, seed, split), out_uri, shard_size, prefix="domain",
                               manifest_extra=extra)


@dataclasses.dataclass(frozen=True)
class EmbeddedLake:
    """Paths of the embedded lake: training shards, COCO-format eval prompts (seen / held-out combos)."""

    root: Path
    train_shards: Path
    eval_captions: Path
    heldout_captions: Path


def ensure_embedded_lake(root: str | os.PathLike | None = None, num_train: int = 20_000, num_eval: int = 5_000,
                         num_heldout: int = 1_200, shard_size: int = 5_000) -> EmbeddedLake:
    """Generate (once; atomically) the embedded lake under ``root`` and return its paths.

    Default root: ``$WADI_CACHE/embedded_lake/v1-<sizes>``. Train prompts: domain seed 0, training
    combinations; eval prompts: seed 1, the same combinations (new images); held-out prompts:
    seed 2, the 12 combinations never used for training.
    """
    tag = f"{LAKE_VERSION}-{num_train}-{num_eval}-{num_heldout}-{shard_size}"
    root = Path(root) if root is not None else storage.default_cache_dir() / "embedded_lake" / tag
    lake = EmbeddedLake(root, root / "train", root / "eval_captions.json", root / "heldout_captions.json")
    if (root / "COMPLETE").exists():
        return lake
    tmp = root.with_name(f"{root.name}.tmp-{uuid.uuid4().hex[:8]}")
    domain_to_shards(num_train, str(tmp / "train"), seed=0, split="train", shard_size=shard_size)
    write_coco_captions(eval_prompts(num_eval, seed=1, split="train"), str(tmp / "eval_captions.json"),
                        description="WaDi embedded domain: eval prompts, combinations seen in training")
    write_coco_captions(eval_prompts(num_heldout, seed=2, split="heldout"), str(tmp / "heldout_captions.json"),
                        description="WaDi embedded domain: held-out combinations never seen in training")
    (tmp / "COMPLETE").write_text(json.dumps({"version": tag}))
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(root)
    except OSError:  # another process won the race: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / "COMPLETE").exists():
            raise
    return lake
