"""Evaluate a model (generation + metrics as one Ray job), build reference statistics, or run the
scheduled mode over a training run's checkpoints. Protocol: docs/EVALUATION.md.

    # the embedded default: teacher, 25 steps, CFG 3, domain FID / alignment vs 5k renders
    python jobs/evaluate.py run --model embedded --steps 25 --guidance 3
    # a distilled one-step student (exported pipeline dir, s3:// prefix, models:/ or runs:/ URI)
    python jobs/evaluate.py run --model outputs/distill/export --steps 1 --guidance 1
    # COCO-30k with Inception FID + CLIP score (weights from local files or s3://)
    python jobs/evaluate.py run --model s3://b/sd15-wadi --prompts coco30k --protocol-size 256 \\
        --extractor inception:s3://b/weights/inception-2015-12-05.pt --scorers clip:/w/vit_g14.bin \\
        --reference s3://b/ref/coco2014-val --reference-images s3://b/coco/val2014
    # reference statistics only (computed once, stored with a manifest)
    python jobs/evaluate.py reference --reference-images /data/coco/val2014 --reference s3://b/ref/coco2014-val \\
        --extractor inception:/w/inception-2015-12-05.pt --protocol-size 256
    # cron: evaluate every checkpoint under a storage path that has not been evaluated yet
    python jobs/evaluate.py schedule --checkpoints s3://b/runs/wadi-sd15/checkpoints --teacher s3://b/sd15 \\
        --train-run-id <mlflow run id>
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.eval_runs import (EvalConfig, RayResources, TrackingSpec, ensure_reference,  # noqa: E402
                                 init_ray, run_evaluation, run_schedule)
from pipelines.evaluation import MetricsSpec  # noqa: E402
from pipelines.generation import ModelSpec  # noqa: E402
from pipelines.tracking import redact  # noqa: E402


def _common(p: argparse.ArgumentParser) -> None:
    d, m, r = EvalConfig(), MetricsSpec(), RayResources()
    g = p.add_argument_group("model")
    g.add_argument("--model", default="embedded",
                   help="diffusers dir, s3:// prefix, models:/..., runs:/... or 'embedded' (the teacher)")
    g.add_argument("--adapter", default=None, help="WaDi adapter .safetensors applied on --model (a checkpoint)")
    g.add_argument("--steps", type=int, default=1, help="DDIM steps, trailing spacing (teacher: 25)")
    g.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance (teacher: 3)")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    g = p.add_argument_group("prompts")
    g.add_argument("--prompts", default=d.prompts,
                   help="coco30k | domain:N:SEED:SPLIT | hpsv2:DIR | captions_val201x.json | list.txt | list.json")
    g.add_argument("--num-prompts", type=int, default=None)
    g.add_argument("--draw-seed", type=int, default=d.draw_seed, help="seed of the one-caption-per-image COCO draw")
    g.add_argument("--seed", type=int, default=d.seed, help="noise seed (per prompt key)")
    g = p.add_argument_group("metrics")
    g.add_argument("--extractor", default=m.extractor, help="domain | inception:URI | thumbnail | none | import:mod:fn")
    g.add_argument("--scorers", default=",".join(m.scorers),
                   help="comma list: domain, clip:URI, hps:URI, mean_intensity, import:mod:fn ('' for none)")
    g.add_argument("--clip-model", default=m.clip_model)
    g.add_argument("--hps-model", default=m.hps_model)
    g.add_argument("--protocol-size", type=int, default=m.protocol_size, help="256 = COCO protocol; 0 = off")
    g.add_argument("--reference", default=str(REPO / d.reference) if d.reference else None,
                   help="stored reference statistics (dir or s3://); built from --reference-images if missing")
    g.add_argument("--reference-images", default=d.reference_images,
                   help="real images to build --reference from when it is missing (dir, s3://, domain:N:SEED:SPLIT)")
    g = p.add_argument_group("outputs and resources")
    g.add_argument("--out", default=None, help="output dir or s3:// prefix (default outputs/eval/<name>)")
    g.add_argument("--save-images", default="files", choices=["files", "none"])
    g.add_argument("--gen-workers", type=int, default=r.gen_workers)
    g.add_argument("--metric-workers", type=int, default=r.metric_workers)
    g.add_argument("--batch-size", type=int, default=r.batch_size)
    g.add_argument("--cpus-per-actor", type=float, default=r.cpus_per_actor)
    g.add_argument("--gpus-per-actor", type=float, default=r.gpus_per_actor)
    g.add_argument("--experiment", default="wadi-eval")
    g.add_argument("--tracking-uri", default=None)
    g.add_argument("--run-name", default=None)
    g.add_argument("--train-run-id", default=None, help="MLflow run id of the training run to link to")


def build_config(args: argparse.Namespace) -> EvalConfig:
    model = ModelSpec(uri=args.model, adapter=args.adapter, steps=args.steps, guidance=args.guidance,
                      dtype=args.dtype)
    metrics = MetricsSpec(extractor=args.extractor, scorers=tuple(s for s in args.scorers.split(",") if s),
                          clip_model=args.clip_model, hps_model=args.hps_model, protocol_size=args.protocol_size)
    name = args.run_name or f"{Path(args.model.rstrip('/')).name}-{args.steps}step-cfg{args.guidance:g}"
    return EvalConfig(
        model=model, prompts=args.prompts, num_prompts=args.num_prompts, draw_seed=args.draw_seed, seed=args.seed,
        metrics=metrics, reference=args.reference or None, reference_images=args.reference_images or None,
        out=args.out or str(REPO / "outputs" / "eval" / name), save_images=args.save_images,
        ray=RayResources(args.gen_workers, args.metric_workers, args.batch_size, args.cpus_per_actor,
                         args.gpus_per_actor),
        tracking=TrackingSpec(experiment=args.experiment, tracking_uri=args.tracking_uri, run_name=args.run_name,
                              train_run_id=args.train_run_id),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    _common(sub.add_parser("run", help="generate + metrics for one model"))
    _common(sub.add_parser("reference", help="compute and store reference statistics only"))
    s = sub.add_parser("schedule", help="evaluate every not-yet-evaluated checkpoint (idempotent, for cron)")
    _common(s)
    s.add_argument("--checkpoints", required=True, help="folder / s3:// prefix whose subdirs are checkpoints")
    s.add_argument("--teacher", default="embedded", help="base model for checkpoints that hold only an adapter")
    s.add_argument("--limit", type=int, default=None, help="evaluate at most this many now")
    pr = sub.add_parser("prompts", help="draw one caption per image from a COCO captions JSON and store the list")
    pr.add_argument("--captions", required=True, help="captions_val2014.json / captions_val2017.json")
    pr.add_argument("--num", type=int, default=None, help="number of images (default: all)")
    pr.add_argument("--draw-seed", type=int, default=2024)
    pr.add_argument("--out", required=True, help="where to write the list (one caption per line)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]  # `python jobs/evaluate.py` = the embedded default
    return p.parse_args(argv)


def write_drawn_prompts(args: argparse.Namespace) -> dict:
    from wadi_core.metrics.coco import draw_coco_captions, write_prompt_list

    drawn = draw_coco_captions(args.captions, args.num, args.draw_seed)
    sha = write_prompt_list([p.caption for p in drawn], args.out)
    ids = "\n".join(f"{p.image_id}\t{p.file_name}" for p in drawn) + "\n"
    from wadi_core import storage

    storage.write_bytes(args.out + ".images.tsv", ids.encode())
    info = {"captions": args.captions, "num": len(drawn), "draw_seed": args.draw_seed, "sha256": sha}
    print(json.dumps(info, indent=2))
    return info


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.command == "prompts":
        return write_drawn_prompts(args)
    cfg = build_config(args)
    if args.command == "reference":
        if not (cfg.reference and cfg.reference_images):
            raise SystemExit("reference needs --reference (where to store) and --reference-images (real images)")
        init_ray()
        ref = ensure_reference(cfg)
        print(json.dumps(ref.manifest if ref else {}, indent=2))
        return ref.manifest if ref else {}
    if args.command == "schedule":
        if args.out is None:
            cfg = dataclasses.replace(cfg, out=str(REPO / "outputs" / "eval" / "schedule"))
        done = run_schedule(cfg, args.checkpoints, args.teacher, args.limit)
        print(redact(f"evaluated {len(done)} new checkpoint(s): {done}"))
        return {"evaluated": done}
    result = run_evaluation(cfg)
    print(json.dumps(result["metrics"], indent=2))
    print(redact(f"outputs: {result['out']}  (grid.png, metrics.json); MLflow experiment: {cfg.tracking.experiment}"))
    return result


if __name__ == "__main__":
    main()
