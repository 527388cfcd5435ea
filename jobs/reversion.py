"""ReVersion with a WaDi one-step student: learn a relation token <R> from exemplar two-object
scenes without the relation word, then draw new object pairs in that relation with the scene
teacher (25 steps, CFG) and its one-step student, and measure relation accuracy (object positions
found by colour) and wall time per image. Docs: docs/DOWNSTREAM.md.

The single-object embedded teacher cannot draw relations, so the job first adapts it to two-object
scenes (``scene_teacher``: reused when the folder holds a pipeline, trained there otherwise) and,
with ``distill_steps``, distils its one-step student with jobs/distill_local.py:

    python jobs/reversion.py out=runs/downstream/reversion scene_teacher=runs/downstream/scene_teacher \\
        distill_steps=600 "relations=[above, left of]"
    python jobs/reversion.py scene_teacher=DIR student=DIR/../scene_student/export   # reuse both
    python jobs/reversion.py --print-config                                          # every key

Writes ``<out>/tokens/<relation>.safetensors`` (the learned embedding), ``grid.png``, ``exemplars.png``,
``metrics.json`` and ``table.md``; logs them to MLflow (experiment wadi-downstream).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

from wadi_core.domain import TEACHER_GUIDANCE, TEACHER_STEPS
from wadi_core.downstream.report import labelled_grid, markdown_table
from wadi_core.downstream.reversion import (RelationConfig, SceneTeacherConfig, finetune_scene_teacher, invert_relation,
                                            load_token, relation_accuracy, save_token, scene_eval_set)
from wadi_core.downstream.sampling import load_one_step_student, sample, seeded_noise, time_per_image
from wadi_core.downstream.subjects import sample_scene, scene_caption
from wadi_core.images import image_grid
from wadi_core.models import load_teacher

from pipelines.config.cli import add_config_arguments, config_from_args
from pipelines.tracking.downstream import downstream_run


@dataclass(frozen=True)
class ReVersionJob:
    """Scene teacher (``scene``), its student, the relation inversion (``relation``; its ``relation``
    and ``token`` are set per entry of ``relations``) and the evaluation."""

    base_teacher: str = "embedded"  # what the scene teacher is fine-tuned from
    scene_teacher: str = str(REPO / "runs" / "downstream" / "scene_teacher")  # loaded if it holds a pipeline, else trained there
    scene: SceneTeacherConfig = field(default_factory=SceneTeacherConfig)
    student: str = ""               # one-step export of the scene teacher (local or s3://)
    distill_steps: int = 0          # > 0 and no student: distil one with jobs/distill_local.py
    distill_minutes: float = 0.0    # optional wall-clock cap of that distillation
    relations: tuple[str, ...] = ("above",)  # of: above, below, left of, right of
    relation: RelationConfig = field(default_factory=RelationConfig)
    eval_scenes: int = 64           # new object pairs per relation
    teacher_steps: int = TEACHER_STEPS  # the teacher's sampling steps
    guidance: float = TEACHER_GUIDANCE  # the teacher's classifier-free guidance scale
    timing_batch: int = 16  # images per timed call
    out: str = str(REPO / "outputs" / "reversion")  # output folder (metrics.json, table.md, grid.png)
    threads: int = 0  # torch threads (0: torch's default)
    experiment: str = "wadi-downstream"  # MLflow experiment
    tracking_uri: str = ""  # MLflow tracking URI ("": MLFLOW_TRACKING_URI, else sqlite ./runs/mlflow.db)
    run_name: str = ""  # MLflow run name ("": reversion-<out folder>)


def parse_args(argv: list[str] | None = None) -> ReVersionJob:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    return config_from_args(ReVersionJob, p.parse_intermixed_args(argv))


def _distill(scene_teacher: Path, out: Path, steps: int, minutes: float, threads: int) -> Path:
    """A one-step student of the scene teacher: jobs/distill_local.py on scene captions."""
    rng = np.random.default_rng(5)
    prompts = out / "scene_prompts.txt"
    prompts.write_text("\n".join(scene_caption(sample_scene(rng)) for _ in range(20_000)) + "\n")
    cmd = [sys.executable, str(REPO / "jobs" / "distill_local.py"), f"teacher={scene_teacher}", f"prompts={prompts}",
           f"out_dir={out / 'scene_student'}", "batch_size=32", f"steps={steps}", f"max_minutes={minutes}",
           "sample_every=0", f"threads={threads or 1}", "vsd.student_ema=0.99"]
    print("distilling the scene student:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out / "scene_student" / "export"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    relations = [r.strip() for r in args.relations if r.strip()]
    scene_dir = Path(args.scene_teacher)
    tcfg = args.scene
    params = {"base_teacher": args.base_teacher, "scene_teacher": str(scene_dir), "student": args.student or "",
              "distill_steps": args.distill_steps, "distill_minutes": args.distill_minutes, "relations": ",".join(relations),
              **{f"scene_teacher.{k}": v for k, v in tcfg.__dict__.items()},
              **{f"inversion.{k}": v for k, v in args.relation.__dict__.items() if k not in ("relation", "token")},
              "eval_scenes": args.eval_scenes, "teacher_steps": args.teacher_steps, "guidance": args.guidance,
              "threads": torch.get_num_threads()}
    rows: dict[str, dict[str, float]] = {}
    columns: dict[str, torch.Tensor] = {}
    with downstream_run("reversion", out, args.experiment, args.tracking_uri, args.run_name, params,
                        started=started) as run:
        tracker = run.tracker
        timings: dict[str, float] = {}
        if not (scene_dir / "model_index.json").exists():
            t0 = time.time()
            summary = finetune_scene_teacher(load_teacher(args.base_teacher), tcfg, scene_dir, log=tracker.log_metrics)
            timings["scene_teacher_seconds"] = time.time() - t0
            tracker.log_metrics(summary)
        student_uri = args.student or None
        if student_uri is None and args.distill_steps > 0:
            t0 = time.time()
            student_uri = str(_distill(scene_dir, out, args.distill_steps, args.distill_minutes, args.threads))
            timings["distill_seconds"] = time.time() - t0
        for relation in relations:
            slug = relation.replace(" ", "_")
            teacher = load_teacher(scene_dir)
            cfg = dataclasses.replace(args.relation, relation=relation, token=f"<R-{slug}>")
            t0 = time.time()
            inv = invert_relation(teacher, cfg, log=lambda m, s, sl=slug: tracker.log_metrics(
                {f"{sl}/{k}": v for k, v in m.items()}, s))
            timings[f"{slug}/inversion_seconds"] = time.time() - t0
            token_file = out / "tokens" / f"{slug}.safetensors"
            save_token(teacher, cfg.token, token_file, relation)
            image_grid(torch.from_numpy(inv["exemplars"]).permute(0, 3, 1, 2).float() / 255, rows=1).save(
                out / f"exemplars_{slug}.png")
            scenes = scene_eval_set(args.eval_scenes, relation)
            with_token = [scene_caption(s, relation_word=cfg.token) for s in scenes]
            with_word = [scene_caption(s) for s in scenes]
            noise = seeded_noise(teacher, len(scenes), seed=0)
            models = [("teacher", teacher, args.teacher_steps, args.guidance)]
            if student_uri:
                student = load_one_step_student(student_uri)
                load_token(student, token_file)
                models.append(("student", student, 1, 1.0))
            for name, model, steps, guidance in models:
                for label, prompts in (("<R>", with_token), ("word", with_word)):
                    imgs = sample(model, prompts, noise, steps, guidance)
                    row = relation_accuracy(imgs, scenes)
                    if label == "<R>":
                        nb = min(args.timing_batch, len(prompts))
                        row["seconds_per_image"] = time_per_image(
                            lambda m=model, st=steps, g=guidance: sample(m, prompts[:nb], noise[:nb], st, g), nb)
                    key = f"{relation}: {name} {steps} step{'s' if steps > 1 else ''}, {label}"
                    rows[key] = row
                    columns[f"{name} {label}" + (f" ({relation})" if len(relations) > 1 else "")] = imgs
                    tracker.log_metrics({f"{slug}/{name}/{'token' if label == '<R>' else 'word'}/{k}": v
                                         for k, v in row.items()})
                    print(key, json.dumps({k: round(v, 4) for k, v in row.items()}), flush=True)
            tracker.set_tags({f"{slug}.nearest_preposition": inv["nearest_preposition"]})
            if student_uri:
                t = rows[f"{relation}: teacher {args.teacher_steps} steps, <R>"]
                s = rows[f"{relation}: student 1 step, <R>"]
                tracker.log_metrics({
                    f"{slug}/accuracy_student_over_teacher": s["relation_accuracy"] / max(t["relation_accuracy"], 1e-9),
                    f"{slug}/time_student_over_teacher": s["seconds_per_image"] / t["seconds_per_image"]})
            rows_first = scenes
        n = min(8, len(rows_first))
        # rows are the scenes of the relation in each column (one relation: its captions on the left)
        grid = labelled_grid([c[:n] for c in columns.values()], list(columns),
                             row_labels=[scene_caption(s) for s in rows_first[:n]] if len(relations) == 1 else ())
        grid.save(out / "grid.png")
        table = markdown_table(rows, ["relation_accuracy", "both_found", "axis_accuracy", "seconds_per_image"], 3)
        result = run.finish({"rows": rows, "timings": timings, "student": student_uri}, table,
                            files=["grid.png", "metrics.json", "table.md", *[p.name for p in out.glob("exemplars_*.png")]],
                            folders=("tokens",), metrics=timings)
    print(table)
    print(run.where())
    return result


if __name__ == "__main__":
    main()
