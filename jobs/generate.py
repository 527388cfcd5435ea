"""Generate images for a prompt source on Ray Data actors and write them as PNG files or shards.

    # teacher baseline, 25 steps, CFG 3, on the embedded domain's eval prompts
    python jobs/generate.py model.uri=embedded model.steps=25 model.guidance=3 prompts=domain:1000 out=outputs/gen/teacher
    # HPSv2 benchmark layout <out>/<style>/{idx:05d}.png from the four benchmark JSONs
    python jobs/generate.py model.uri=models:/wadi-sd15@champion prompts=hpsv2:/data/hpdv2/benchmark out=s3://b/hps
    # COCO-30k as WebDataset shards (<key>.png + <key>.txt) on S3, 8 GPU actors
    python jobs/generate.py model.uri=s3://b/export prompts=coco30k format=webdataset out=s3://b/coco30k \
        ray.gen_workers=8 ray.gpus_per_actor=1 ray.accelerator_type=A10G
    python jobs/generate.py --print-config out=x        # every key

Noise is seeded per prompt key (hash of ``seed`` and the key), so the images do not depend on
``ray.gen_workers`` or ``ray.batch_size``. ``<out>/prompts.jsonl`` lists key, prompt and seed of every image;
``<out>/generation.json`` the model, settings and the prompt list's sha256.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from wadi_core import storage
from wadi_core.redact import redact

from pipelines.config.cli import add_config_arguments, config_from_args
from pipelines.data.prompts import pyarrow_filesystem
from pipelines.evaluate.config import ModelSpec, RayResources
from pipelines.evaluate.generation import generation_dataset, load_prompts, prompt_seed, write_png_files
from pipelines.evaluate.runs import check_actor_accelerator, init_evaluation_ray


@dataclass(frozen=True)
class GenerateJob:
    """``jobs/generate.py``'s configuration (``out`` is required)."""

    out: str                        # local folder or s3:// prefix
    model: ModelSpec = field(default_factory=ModelSpec)
    prompts: str = "domain:5000:1:train"  # coco30k | domain:N:SEED:SPLIT | hpsv2:DIR | captions_val201x.json | .txt | .json
    num_prompts: int | None = None  # keep the first N prompts of the set, per group (None: all)
    draw_seed: int = 2024  # seed of the one-caption-per-image draw from a COCO captions JSON
    seed: int = 0  # per-prompt noise seed
    format: Literal["files", "webdataset"] = "files"  # files: one PNG per image; webdataset: tar shards
    shard_size: int = 1000          # images per tar shard (webdataset)
    ray: RayResources = field(default_factory=lambda: RayResources(batch_size=16))  # generator actors


def parse_args(argv: list[str] | None = None) -> GenerateJob:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    return config_from_args(GenerateJob, p.parse_intermixed_args(argv))


def _to_webdataset_rows(batch: dict) -> dict:
    # keys must not contain dots (Ray splits the sample key at the first dot)
    return {"__key__": [str(k).replace(".", "_") for k in batch["key"]], "png": batch["image"],
            "txt": [str(p) for p in batch["prompt"]]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    spec, resources = args.model, args.ray
    records, info = load_prompts(args.prompts, args.num_prompts, args.draw_seed)
    init_evaluation_ray()
    check_actor_accelerator(resources)
    ds = generation_dataset(records, spec, args.seed, concurrency=resources.gen_workers,
                            batch_size=resources.batch_size, cpus_per_actor=resources.cpus_per_actor,
                            gpus_per_actor=resources.gpus_per_actor,
                            accelerator_type=resources.accelerator_for(resources.gpus_per_actor))
    if args.format == "files":
        ds.map_batches(write_png_files, fn_kwargs={"root": args.out}, batch_format="numpy", num_cpus=0.25) \
          .select_columns(["key"]).materialize()
    else:
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
