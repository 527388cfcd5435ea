"""ControlNet with a WaDi one-step student: train a ControlNet (silhouette control) against the
teacher, then generate with teacher + ControlNet (25 steps, CFG) and student + the same ControlNet
(1 step), and measure control adherence (IoU with the silhouette), attribute alignment, FID and
wall time per image both ways. Docs: docs/DOWNSTREAM.md.

    # embedded teacher + a student export of jobs/distill_local.py
    python jobs/controlnet.py student=runs/ds_student/export
    # data-parallel training on Ray Train from an image lake (written from domain renders when lake= is empty)
    python jobs/controlnet.py student=runs/ds_student/export trainer=ray workers=2 lake=s3://b/control-lake
    # a ControlNet you already have (diffusers folder, local or s3://): no training
    python jobs/controlnet.py teacher=/models/sd15 student=s3://b/sd15-wadi/export \\
        controlnet=s3://b/controlnet-seg-sd15 eval_prompts=64
    python jobs/controlnet.py --print-config student=x   # every key

Writes ``<out>/controlnet/`` (diffusers ControlNetModel, safetensors), ``<out>/grid.png`` and
``<out>/metrics.json``, and logs them with params and metrics to MLflow (experiment wadi-downstream).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

from wadi_core.config import base_part, to_flat_dict
from wadi_core.domain import TEACHER_GUIDANCE, TEACHER_STEPS
from wadi_core.domain.evaluator import load_domain_evaluator
from wadi_core.domain.quality import real_feature_stats
from wadi_core.downstream import geometry as geo
from wadi_core.downstream.controlnet import (ControlNetConfig, control_eval_set, control_tensor, controlnet_residuals,
                                             domain_control_samples, load_controlnet, train_controlnet)
from wadi_core.downstream.report import domain_scores, labelled_grid, markdown_table
from wadi_core.downstream.sampling import image_size, load_one_step_student, sample, seeded_noise, time_per_image
from wadi_core.models import load_teacher

from pipelines.config.cli import add_config_arguments, config_from_args
from pipelines.data.control_lake import write_control_shards
from pipelines.tracking.downstream import downstream_run
from pipelines.train.controlnet import RayControlNetSpec, run_controlnet_training


@dataclass(frozen=True)
class ControlNetJob(ControlNetConfig):
    """The ControlNet training (``ControlNetConfig``), the models and the evaluation."""

    student: str = ""               # WaDi one-step export of the teacher (local or s3://), required
    teacher: str = "embedded"       # diffusers SD folder, s3:// prefix or "embedded"
    controlnet: str = ""            # an existing diffusers ControlNetModel folder (local or s3://): no training
    trainer: str = "local"          # local: one process | ray: Ray Train workers on an image lake
    lake: str = ""                  # trainer=ray: image lake (pipelines/data/control_lake.py), local or s3://;
                                    # empty: num_images domain renders written to <out>/lake
    workers: int = 2                # trainer=ray: data-parallel workers (batch_size is the global batch)
    cpus_per_worker: float = 0.5    # Ray Data needs a CPU beside the workers (checked before the run)
    gpus_per_worker: float = 0.0  # GPUs per Ray worker (trainer=ray)
    storage_path: str = ""          # trainer=ray: checkpoints, local or s3:// (default <out>/ray)
    checkpoint_every: int = 200  # steps between checkpoints (trainer=ray)
    ray_address: str = ""           # join this cluster (or RAY_ADDRESS); default: a local Ray
    eval_prompts: int = 300         # domain captions with exact silhouettes
    teacher_steps: int = TEACHER_STEPS  # the teacher's sampling steps
    guidance: float = TEACHER_GUIDANCE  # teacher CFG
    control_scale: float = 1.0  # ControlNet conditioning scale
    fid_reference: int = 2000       # real renders for the FID reference (0: no FID)
    timing_batch: int = 32          # images per timed call
    baselines: bool = True          # also teacher / student without the ControlNet
    out: str = str(REPO / "outputs" / "controlnet")  # local dir of the ControlNet, grid.png, metrics.json, table.md
    threads: int = 0                # torch threads (0: torch's default)
    experiment: str = "wadi-downstream"  # MLflow experiment
    tracking_uri: str = ""          # default: MLFLOW_TRACKING_URI or sqlite ./runs/mlflow.db
    run_name: str = ""  # MLflow run name ("": controlnet-<out folder>)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.student:
            raise ValueError("student=<one-step export of the teacher> is required (e.g. <distill out>/export)")
        if self.trainer not in ("local", "ray"):
            raise ValueError(f"trainer must be local or ray, got {self.trainer!r}")
        if self.trainer == "ray" and self.workers < 1:
            raise ValueError(f"trainer=ray needs workers >= 1, got {self.workers}")


def parse_args(argv: list[str] | None = None) -> ControlNetJob:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    return config_from_args(ControlNetJob, p.parse_intermixed_args(argv))


def _train_on_ray(args: ControlNetJob, cfg: ControlNetConfig, out: Path, size: int, tracker, tracking_uri: str):
    """The ControlNet trained by Ray Train workers (pipelines/train/controlnet.py) on an image lake."""
    lake = args.lake
    if not lake:
        lake = str(out / "lake")
        if sorted(Path(lake).glob("*.tar")):
            print(f"image lake: reusing {lake}")
        else:
            tmp = Path(lake + ".partial")  # renamed when complete: a cut-off write is never reused
            shutil.rmtree(tmp, ignore_errors=True)
            paths = write_control_shards(tmp, domain_control_samples(cfg.num_images, cfg.seed, size), per_shard=500)
            shutil.rmtree(lake, ignore_errors=True)
            tmp.rename(lake)
            print(f"image lake: {cfg.num_images} domain renders with silhouettes in {len(paths)} shards at {lake}")
    spec = RayControlNetSpec(lake=lake, teacher=args.teacher, workers=args.workers,
                             cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                             storage_path=args.storage_path or str(out / "ray"), run_name=f"controlnet-{out.name}",
                             checkpoint_every=args.checkpoint_every, shuffle_seed=cfg.seed)
    controlnet, metrics = run_controlnet_training(cfg, spec, args.ray_address or None, tracker.run_id, tracking_uri,
                                                  args.experiment)
    summary = {"train_steps": float(metrics.get("step", 0)), "train_seconds": float(metrics.get("train_seconds", 0)),
               "resumed_from_step": float(metrics.get("resumed_from", 0)),
               **{k: float(v) for k, v in metrics.items() if k.startswith("data/bad_")}}
    return controlnet, summary


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    cfg = base_part(args, ControlNetConfig)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_teacher(args.teacher)
    student = load_one_step_student(args.student)
    params = {"teacher": args.teacher, "student": args.student, "controlnet": args.controlnet or "trained",
              "trainer": args.trainer, **({"lake": args.lake or "<out>/lake", "workers": args.workers}
                                          if args.trainer == "ray" else {}),
              **to_flat_dict(cfg, "train."), **{f"eval.{k}": getattr(args, k) for k in
                                                ("eval_prompts", "teacher_steps", "guidance", "control_scale",
                                                 "fid_reference", "timing_batch")},
              "threads": torch.get_num_threads()}
    with downstream_run("controlnet", out, args.experiment, args.tracking_uri, args.run_name, params,
                        started=started) as run:
        tracker, tracking_uri = run.tracker, run.tracking_uri
        if args.controlnet:
            controlnet, summary = load_controlnet(args.controlnet), {"train_steps": 0.0, "train_seconds": 0.0}
        else:
            if args.trainer == "ray":
                controlnet, summary = _train_on_ray(args, cfg, out, image_size(teacher), tracker, tracking_uri)
            else:
                controlnet, summary = train_controlnet(teacher, cfg, log=tracker.log_metrics)
            controlnet.save_pretrained(out / "controlnet", safe_serialization=True)
        size = image_size(teacher)
        prompts, masks = control_eval_set(args.eval_prompts, seed=1, size=size)
        target = masks >= 0.5
        noise = seeded_noise(teacher, len(prompts), seed=0)
        control = control_tensor(masks, controlnet, teacher)
        evaluator = load_domain_evaluator()
        real = real_feature_stats(evaluator, n=args.fid_reference) if args.fid_reference else None
        runs = {"teacher+controlnet": (teacher, args.teacher_steps, args.guidance, True),
                "student+controlnet": (student, 1, 1.0, True)}
        if args.baselines:
            runs |= {"teacher (no control)": (teacher, args.teacher_steps, args.guidance, False),
                     "student (no control)": (student, 1, 1.0, False)}
        rows: dict[str, dict[str, float]] = {}
        images: dict[str, torch.Tensor] = {}
        for name, (model, steps, guidance, controlled) in runs.items():
            def generate(lo: int, hi: int) -> torch.Tensor:
                res = controlnet_residuals(controlnet, control[lo:hi], args.control_scale) if controlled else None
                return sample(model, prompts[lo:hi], noise[lo:hi], steps, guidance, res)

            print(f"sampling {name}: {len(prompts)} images, {steps} step(s), CFG {guidance:g}", flush=True)
            imgs = torch.cat([generate(i, i + 100) for i in range(0, len(prompts), 100)])
            images[name] = imgs
            row = {"iou": float(geo.iou(geo.foreground_mask(imgs), target).mean())}
            row |= domain_scores(imgs, prompts, evaluator, real)
            nb = min(args.timing_batch, len(prompts))
            row["seconds_per_image"] = time_per_image(lambda: generate(0, nb), nb)
            rows[name] = row
            print(f"  {json.dumps({k: round(v, 4) for k, v in row.items()})}", flush=True)
        t, s = rows["teacher+controlnet"], rows["student+controlnet"]
        ratios = {"iou_student_over_teacher": s["iou"] / max(t["iou"], 1e-9),
                  "time_student_over_teacher": s["seconds_per_image"] / t["seconds_per_image"],
                  "alignment_student_over_teacher": s["alignment"] / max(t["alignment"], 1e-9)}
        flat = {f"{name.replace(' ', '_').replace('(', '').replace(')', '').replace('+', '_')}/{k}": v
                for name, row in rows.items() for k, v in row.items()}
        tracker.log_metrics({**flat, **ratios, **summary})
        n = min(8, len(prompts))
        columns = [torch.as_tensor(masks[:n]).float()[:, None].expand(-1, 3, -1, -1)] + [images[k][:n] for k in runs]
        grid = labelled_grid(columns, ["control", *runs], row_labels=[p.replace("a ", "", 1) for p in prompts[:n]])
        grid.save(out / "grid.png")
        table = markdown_table(rows, ["iou", "alignment", "all_correct", "fid", "seconds_per_image"], 4)
        result = run.finish({"rows": rows, "ratios": ratios, "train": summary, "grid": str(out / "grid.png")}, table,
                            files=("grid.png", "metrics.json"), folders=("controlnet",))
    print(table)
    print(json.dumps(ratios, indent=1))
    print(run.where())
    return result


if __name__ == "__main__":
    main()
