"""Write a prompt lake: WebDataset tar shards (+ manifest.json) and COCO-format evaluation prompts.

JourneyDB (bring your own copy; streamed, deduped, sorted, shuffled with seed 2023):
    python jobs/make_prompt_shards.py journeydb "inputs=[data/train/train_anno_realease_repath.jsonl.tgz]" \
        out=s3://bucket/lake/journeydb
Embedded domain (seeded):
    python jobs/make_prompt_shards.py domain num=20000 out=./lake/domain eval_num=5000
    python jobs/make_prompt_shards.py domain --print-config
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Literal

from wadi_core import storage
from wadi_core.domain.attributes import eval_prompts
from wadi_core.prompts import domain_to_shards, journeydb_to_shards, write_coco_captions
from wadi_core.redact import redact

from pipelines.config.cli import add_config_arguments, config_from_args

Split = Literal["train", "heldout", "all"]


@dataclass(frozen=True)
class ShardsConfig:
    out: str                                          # output folder or s3:// prefix for the shards
    shard_size: int = 10_000  # prompts per tar shard


@dataclass(frozen=True)
class JourneyDBShards(ShardsConfig):
    """``journeydb``: from JourneyDB train_anno*.jsonl(.tgz) files (local or s3://)."""

    inputs: tuple[str, ...] = ()  # JourneyDB train_anno*.jsonl(.tgz) files (local or s3://)
    seed: int = 2023  # shuffle seed of the deduped, sorted captions

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("inputs must list the JourneyDB annotation files, e.g. inputs=[train_anno.jsonl.tgz]")


@dataclass(frozen=True)
class DomainShards(ShardsConfig):
    """``domain``: from the embedded procedural domain."""

    num: int = 20_000  # training prompts to draw
    seed: int = 0  # seed of the drawn domain attributes
    split: Split = "train"  # domain split of the training prompts
    eval_num: int = 5_000             # COCO-format eval prompts (0: none)
    eval_split: Split = "train"  # domain split of the eval prompts
    eval_seed: int = 1  # seed of the eval prompts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="source", required=True)
    for name, cls in (("journeydb", JourneyDBShards), ("domain", DomainShards)):
        add_config_arguments(sub.add_parser(name, help=cls.__doc__.split(": ", 1)[1]))
    ns = p.parse_args(argv)
    args = config_from_args(JourneyDBShards if ns.source == "journeydb" else DomainShards, ns)

    if isinstance(args, JourneyDBShards):
        manifest = journeydb_to_shards(list(args.inputs), args.out, args.shard_size, seed=args.seed, progress=True)
    else:
        manifest = domain_to_shards(args.num, args.out, seed=args.seed, split=args.split, shard_size=args.shard_size)
        if args.eval_num:
            eval_uri = storage.join(args.out, "eval_captions.json")
            write_coco_captions(eval_prompts(args.eval_num, args.eval_seed, args.eval_split), eval_uri)
            print(redact(f"wrote {args.eval_num} COCO-format eval prompts to {eval_uri}"))
    print(json.dumps({k: v for k, v in manifest.items() if k != "shards"}, indent=1))


if __name__ == "__main__":
    main()
