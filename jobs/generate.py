"""Generate images for a prompt source on Ray Data actors and write them as PNG files or shards.

    # teacher baseline, 25 steps, CFG 3, on the embedded domain's eval prompts
    python jobs/generate.py --model embedded --steps 25 --guidance 3 --prompts domain:1000 --out outputs/gen/teacher
    # HPSv2 benchmark layout <out>/<style>/{idx:05d}.png from the four benchmark JSONs
    python jobs/generate.py --model models:/wadi-sd15@champion --prompts hpsv2:/data/hpdv2/benchmark --out s3://b/hps
    # COCO-30k as WebDataset shards (<key>.png + <key>.txt) on S3
    python jobs/generate.py --model s3://b/export --prompts coco30k --format webdataset --out s3://b/coco30k

Noise is seeded per prompt key (hash of ``--seed`` and the key), so the images do not depend on
``--workers`` or ``--batch-size``. ``<out>/prompts.jsonl`` lists key, prompt and seed of every image;
``<out>/generation.json`` the model, settings and the prompt list's sha256.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.eval_runs import init_ray  # noqa: E402
from pipelines.tracking import redact  # noqa: E402
from pipelines.generation import (ModelSpec, generation_dataset, load_prompts, prompt_seed,  # noqa: E402
                                  write_png_files)
from wadi_core import storage  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="diffusers dir, s3:// prefix, models:/..., runs:/..., embedded")
    p.add_argument("--adapter", default=None, help="WaDi adapter .safetensors applied on --model")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--prompts", default="domain:5000:1:train",
                   help="coco30k | domain:N:SEED:SPLIT | hpsv2:DIR | captions_val201x.json | list.txt | list.json")
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--draw-seed", type=int, default=2024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="local folder or s3:// prefix")
    p.add_argument("--format", default="files", choices=["files", "webdataset"])
    p.add_argument("--shard-size", type=int, default=1000, help="images per tar shard (webdataset)")
    p.add_argument("--workers", type=int, default=1, help="generator actors")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cpus-per-actor", type=float, default=0.5)
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    return p.parse_args(argv)


def _to_webdataset_rows(batch: dict) -> dict:
    # keys must not contain dots (Ray splits the sample key at the first dot)
    return {"__key__": [str(k).replace(".", "_") for k in batch["key"]], "png": batch["image"],
            "txt": [str(p) for p in batch["prompt"]]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    spec = ModelSpec(uri=args.model, adapter=args.adapter, steps=args.steps, guidance=args.guidance, dtype=args.dtype)
    records, info = load_prompts(args.prompts, args.num_prompts, args.draw_seed)
    init_ray()
    ds = generation_dataset(records, spec, args.seed, concurrency=args.workers, batch_size=args.batch_size,
                            cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor)
    if args.format == "files":
        ds.map_batches(write_png_files, fn_kwargs={"root": args.out}, batch_format="numpy", num_cpus=0.25) \
          .select_columns(["key"]).materialize()
    else:
        from pipelines.data import pyarrow_filesystem

        fs, path = pyarrow_filesystem(args.out)
        ds.map_batches(_to_webdataset_rows, batch_format="numpy", num_cpus=0.25).write_webdataset(
            path, filesystem=fs, min_rows_per_file=args.shard_size, ray_remote_args={"num_cpus": 0.25})
    tmp = Path(tempfile.mkdtemp(prefix="wadi-gen-"))
    (tmp / "prompts.jsonl").write_text("".join(
        json.dumps({**asdict(r), "seed": prompt_seed(args.seed, r.key)}) + "\n" for r in records))
    summary = {"model": asdict(spec), "seed": args.seed, "prompts": info, "format": args.format,
               "num_images": len(records)}
    (tmp / "generation.json").write_text(json.dumps(summary, indent=2))
    storage.upload_dir(tmp, args.out)
    print(redact(f"wrote {len(records)} images to {args.out} ({args.format})"))
    return summary


if __name__ == "__main__":
    main()
