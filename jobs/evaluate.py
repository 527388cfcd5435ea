"""Evaluate a model (generation + metrics as one Ray job), build reference statistics, or run the
scheduled mode over a training run's checkpoints. Protocol: docs/EVALUATION.md.

    # the embedded default: teacher, 25 steps, CFG 3, domain FID / alignment vs 5k renders
    python jobs/evaluate.py run model.uri=embedded model.steps=25 model.guidance=3
    # a distilled one-step student (exported pipeline dir, s3:// prefix, models:/ or runs:/ URI)
    python jobs/evaluate.py run model.uri=outputs/distill/export
    # COCO-30k with Inception FID + CLIP score (weights from local files or s3://)
    python jobs/evaluate.py run model.uri=s3://b/sd15-wadi prompts=coco30k metrics.protocol_size=256 \
        metrics.extractor=inception:s3://b/weights/inception-2015-12-05.pt "metrics.scorers=[clip:/w/vit_g14.bin]" \
        reference=s3://b/ref/coco2014-val reference_images=s3://b/coco/val2014
    # reference statistics only (computed once, stored with a manifest)
    python jobs/evaluate.py reference reference_images=/data/coco/val2014 reference=s3://b/ref/coco2014-val \
        metrics.extractor=inception:/w/inception-2015-12-05.pt metrics.protocol_size=256
    # cron: evaluate every checkpoint under a storage path that has not been evaluated yet
    python jobs/evaluate.py schedule checkpoints=s3://b/runs/wadi-sd15/checkpoints teacher=s3://b/sd15 \
        tracking.train_run_id=<mlflow run id>
    # one caption per image from a COCO captions JSON
    python jobs/evaluate.py prompts captions=captions_val2017.json out=data/prompts/coco2017_val_5k.txt
    python jobs/evaluate.py run --print-config          # every key of a subcommand, resolved

Resources: ``ray.gen_workers``, ``ray.metric_workers``, ``ray.batch_size``, ``ray.cpus_per_actor``,
``ray.gpus_per_actor``, ``ray.metric_gpus_per_actor`` (feature actors sharing a GPU, e.g. 0.5),
``ray.accelerator_type`` (A100, H100, L4, A10G ...).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from wadi_core import storage
from wadi_core.config import base_part
from wadi_core.metrics.coco import draw_coco_captions, write_prompt_list
from wadi_core.redact import redact

from pipelines.config.cli import add_config_arguments, config_from_args
from pipelines.evaluate.config import EvaluationRun
from pipelines.evaluate.runs import ensure_reference, init_evaluation_ray, run_evaluation, run_schedule


@dataclass(frozen=True)
class EvaluateJob(EvaluationRun):
    """``run`` / ``reference``: one evaluation (``EvaluationRun``); ``out`` "" = outputs/eval/<run name>."""

    reference: str | None = str(REPO / EvaluationRun.reference) if EvaluationRun.reference else None
    out: str = ""  # output folder or s3:// prefix ("": outputs/eval/<run name>)

    def evaluation(self, default_out: str | None = None) -> EvaluationRun:
        """The ``EvaluationRun`` this job runs (its output folder resolved)."""
        m = self.model
        name = self.tracking.run_name or f"{Path(m.uri.rstrip('/')).name}-{m.steps}step-cfg{m.guidance:g}"
        return base_part(self, EvaluationRun, out=self.out or default_out or str(REPO / "outputs" / "eval" / name))


@dataclass(frozen=True)
class ScheduleJob(EvaluateJob):
    """``schedule``: evaluate every not-yet-evaluated checkpoint under ``checkpoints`` (idempotent)."""

    checkpoints: str = ""           # folder / s3:// prefix whose subdirs are checkpoints
    teacher: str = "embedded"       # base model for checkpoints that hold only an adapter
    limit: int | None = None        # evaluate at most this many now

    def __post_init__(self) -> None:
        if not self.checkpoints:
            raise ValueError("schedule needs checkpoints=<folder or s3:// prefix of the run's checkpoints>")


@dataclass(frozen=True)
class PromptsJob:
    """``prompts``: draw one caption per image from a COCO captions JSON and store the list."""

    captions: str                   # captions_val2014.json / captions_val2017.json
    out: str                        # where to write the list (one caption per line)
    num: int | None = None          # number of images (default: all)
    draw_seed: int = 2024  # seed of the draw of one caption per image


COMMANDS = {"run": EvaluateJob, "reference": EvaluateJob, "schedule": ScheduleJob, "prompts": PromptsJob}


def parse_args(argv: list[str] | None = None) -> tuple[str, EvaluateJob | ScheduleJob | PromptsJob]:
    """(subcommand, its resolved config); ``python jobs/evaluate.py`` alone = ``run`` (the embedded default)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    helps = {"run": "generate + metrics for one model", "reference": "compute and store reference statistics only",
             "schedule": ScheduleJob.__doc__.split(": ", 1)[1], "prompts": PromptsJob.__doc__.split(": ", 1)[1]}
    for name, text in helps.items():
        add_config_arguments(sub.add_parser(name, help=text))
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["run", *argv]
    args = p.parse_args(argv)
    return args.command, config_from_args(COMMANDS[args.command], args)


def write_drawn_prompts(args: PromptsJob) -> dict:
    drawn = draw_coco_captions(args.captions, args.num, args.draw_seed)
    sha = write_prompt_list([p.caption for p in drawn], args.out)
    ids = "\n".join(f"{p.image_id}\t{p.file_name}" for p in drawn) + "\n"

    storage.write_bytes(args.out + ".images.tsv", ids.encode())
    info = {"captions": args.captions, "num": len(drawn), "draw_seed": args.draw_seed, "sha256": sha}
    print(json.dumps(info, indent=2))
    return info


def main(argv: list[str] | None = None) -> dict:
    command, job = parse_args(argv)
    if isinstance(job, PromptsJob):
        return write_drawn_prompts(job)
    if command == "reference":
        cfg = job.evaluation()
        if not (cfg.reference and cfg.reference_images):
            raise SystemExit("reference needs reference= (where to store) and reference_images= (real images)")
        init_evaluation_ray()
        ref = ensure_reference(cfg)
        print(json.dumps(ref.manifest if ref else {}, indent=2))
        return ref.manifest if ref else {}
    if isinstance(job, ScheduleJob):
        cfg = job.evaluation(default_out=str(REPO / "outputs" / "eval" / "schedule"))
        done = run_schedule(cfg, job.checkpoints, job.teacher, job.limit)
        print(redact(f"evaluated {len(done)} new checkpoint(s): {done}"))
        return {"evaluated": done}
    cfg = job.evaluation()
    result = run_evaluation(cfg)
    print(json.dumps(result["metrics"], indent=2))
    print(redact(f"outputs: {result['out']}  (grid.png, metrics.json); MLflow experiment: {cfg.tracking.experiment}"))
    return result


if __name__ == "__main__":
    main()
