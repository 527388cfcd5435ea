"""Write a prompt lake: WebDataset tar shards (+ manifest.json) and COCO-format evaluation prompts.

JourneyDB (bring your own copy; streamed, deduped, sorted, shuffled with seed 2023):
    python jobs/make_prompt_shards.py journeydb --input data/train/train_anno_realease_repath.jsonl.tgz \
        --out s3://bucket/lake/journeydb
Embedded domain (seeded):
    python jobs/make_prompt_shards.py domain --num 20000 --out ./lake/domain --eval-num 5000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wadi_core import storage  # noqa: E402
from wadi_core.prompts import domain_to_shards, journeydb_to_shards, write_coco_captions  # noqa: E402

from pipelines.tracking import redact  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="source", required=True)
    j = sub.add_parser("journeydb", help="from JourneyDB train_anno*.jsonl(.tgz) files")
    j.add_argument("--input", nargs="+", required=True, help="annotation files (local or s3://)")
    j.add_argument("--seed", type=int, default=2023)
    d = sub.add_parser("domain", help="from the embedded procedural domain")
    d.add_argument("--num", type=int, default=20_000)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--split", default="train", choices=["train", "heldout", "all"])
    d.add_argument("--eval-num", type=int, default=5_000, help="COCO-format eval prompts (0: none)")
    d.add_argument("--eval-split", default="train", choices=["train", "heldout", "all"])
    d.add_argument("--eval-seed", type=int, default=1)
    for sp in (j, d):
        sp.add_argument("--out", required=True, help="output folder or s3:// prefix for the shards")
        sp.add_argument("--shard-size", type=int, default=10_000)
        sp.add_argument("--writer", default="webdataset", choices=["webdataset", "tarfile"],
                        help="webdataset.ShardWriter (default) or the dependency-free tarfile writer in wadi_core")
    args = p.parse_args(argv)
    if args.writer == "webdataset":
        from pipelines.wds_shards import write_prompt_shards_webdataset as writer
    else:
        from wadi_core.prompts import write_prompt_shards as writer

    if args.source == "journeydb":
        manifest = journeydb_to_shards(args.input, args.out, args.shard_size, seed=args.seed, progress=True,
                                       writer=writer)
    else:
        from wadi_core.domain.attributes import eval_prompts

        manifest = domain_to_shards(args.num, args.out, seed=args.seed, split=args.split, shard_size=args.shard_size,
                                    writer=writer)
        if args.eval_num:
            eval_uri = storage.join(args.out, "eval_captions.json")
            write_coco_captions(eval_prompts(args.eval_num, args.eval_seed, args.eval_split), eval_uri)
            print(redact(f"wrote {args.eval_num} COCO-format eval prompts to {eval_uri}"))
    print(json.dumps({k: v for k, v in manifest.items() if k != "shards"}, indent=1))


if __name__ == "__main__":
    main()
