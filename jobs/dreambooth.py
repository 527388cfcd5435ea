"""DreamBooth with a WaDi one-step student: bind a subject the teacher has never seen (a flat bar,
rendered like the domain) to a rare token with LoRaD, LoRA and full fine-tuning under the same
budget, show it in one-step generation (the adapter trained on the teacher, applied to the
student's weights), and measure subject fidelity and prompt adherence, per kind and seed.
Docs: docs/DOWNSTREAM.md.

    python jobs/dreambooth.py student=runs/ds_student/export              # lorad, lora, full x seeds 0, 1
    python jobs/dreambooth.py student=EXPORT kinds=[lorad] seeds=[0] steps=50 lrs.lorad=3e-3  # one quick run
    python jobs/dreambooth.py --print-config student=x                    # every key

Writes ``<out>/adapters/<kind>_seed<k>.safetensors`` (wadi-adapter-v1), ``<out>/grid.png``,
``<out>/instances.png``, ``<out>/metrics.json`` and ``<out>/table.md``; logs all of it to MLflow.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

from wadi_core.adapters import save_adapter
from wadi_core.config import base_part
from wadi_core.domain import TEACHER_GUIDANCE, TEACHER_STEPS
from wadi_core.domain.evaluator import load_domain_evaluator
from wadi_core.downstream.dreambooth import (DreamBoothConfig, apply_subject_adapter, make_subject_data, subject_scores,
                                             subject_test_prompts, train_dreambooth)
from wadi_core.downstream.report import labelled_grid
from wadi_core.downstream.sampling import image_size, load_one_step_student, sample, seeded_noise
from wadi_core.downstream.subjects import render_subject, subject_caption
from wadi_core.images import image_grid
from wadi_core.models import load_teacher

from pipelines.config.cli import add_config_arguments, config_from_args
from pipelines.tracking.downstream import downstream_run

SCORES = ("fidelity", "shape_rate", "descriptor", "adherence", "acc_colour", "acc_size", "acc_position")


@dataclass(frozen=True)
class DreamBoothJob(DreamBoothConfig):
    """The shared fine-tuning budget (``DreamBoothConfig``; ``kind``, ``lr`` and ``seed`` are set per
    run from ``kinds``, ``lrs`` and ``seeds``), the models and the evaluation."""

    student: str = ""               # WaDi one-step export of the teacher (local or s3://), required
    teacher: str = "embedded"       # diffusers SD folder, s3:// prefix or "embedded"
    kinds: tuple[str, ...] = ("lorad", "lora", "full")  # adapter kinds from wadi_core.adapters
    seeds: tuple[int, ...] = (0, 1)  # one fine-tune per adapter kind and seed
    lrs: dict[str, float] = field(default_factory=dict)  # per kind; default DEFAULT_LR
    teacher_steps: int = TEACHER_STEPS  # the teacher's sampling steps
    guidance: float = TEACHER_GUIDANCE  # the teacher's classifier-free guidance scale
    max_test_prompts: int = 0       # 0: every held-out colour / size / position
    out: str = str(REPO / "outputs" / "dreambooth")  # output folder (metrics.json, table.md, grid.png)
    threads: int = 0  # torch threads (0: torch's default)
    experiment: str = "wadi-downstream"  # MLflow experiment
    tracking_uri: str = ""  # MLflow tracking URI ("": MLFLOW_TRACKING_URI, else sqlite ./runs/mlflow.db)
    run_name: str = ""  # MLflow run name ("": dreambooth-<out folder>)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.student:
            raise ValueError("student=<one-step export of the teacher> is required (e.g. <distill out>/export)")
        if not self.kinds or not self.seeds:
            raise ValueError("kinds and seeds must not be empty")


def parse_args(argv: list[str] | None = None) -> DreamBoothJob:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    return config_from_args(DreamBoothJob, p.parse_intermixed_args(argv))


def _table(rows: dict[str, dict[str, list[float]]], params: dict[str, float]) -> str:
    head = "| adapter | sampler | params | " + " | ".join(SCORES) + " |\n|---|---|---|" + "---|" * len(SCORES) + "\n"
    body = ""
    for name, vals in rows.items():
        kind, _, sampler = name.partition(" / ")
        cells = []
        for s in SCORES:
            v = vals.get(s, [])
            cells.append("-" if not v else f"{np.mean(v):.3f}" + (f" ± {np.std(v):.3f}" if len(v) > 1 else ""))
        n = params.get(kind)
        body += f"| {kind} | {sampler} | {'-' if n is None else f'{n / 1e3:.1f}k'} | " + " | ".join(cells) + " |\n"
    return head + body


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    kinds, seeds, lrs = list(args.kinds), list(args.seeds), args.lrs
    base = base_part(args, DreamBoothConfig)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = subject_test_prompts(base)
    if args.max_test_prompts and args.max_test_prompts < len(specs):  # spread over all colours
        specs = [specs[i] for i in np.linspace(0, len(specs) - 1, args.max_test_prompts).round().astype(int)]
    prompts = [subject_caption(base.token, *s) for s in specs]
    evaluator = load_domain_evaluator()
    configs = {k: DreamBoothConfig(**{**base.__dict__, "kind": k, "lr": float(lrs.get(k, 0.0))}) for k in kinds}
    params = {"teacher": args.teacher, "student": args.student, "kinds": ",".join(kinds), "seeds": ",".join(map(str, seeds)),
              **{f"db.{k}": v for k, v in base.__dict__.items() if k not in ("kind", "lr", "seed")},
              **{f"lr.{k}": c.learning_rate for k, c in configs.items()}, "test_prompts": len(prompts),
              "teacher_steps": args.teacher_steps, "guidance": args.guidance, "threads": torch.get_num_threads()}
    rows: dict[str, dict[str, list[float]]] = {}
    n_params: dict[str, float] = {}
    grid_cols: dict[str, torch.Tensor] = {}
    with downstream_run("dreambooth", out, args.experiment, args.tracking_uri, args.run_name, params,
                        started=started) as run:
        tracker = run.tracker
        teacher = load_teacher(args.teacher)
        size = image_size(teacher)
        noise = seeded_noise(teacher, len(prompts), seed=0)
        subject = make_subject_data(teacher, base, size)
        references = torch.from_numpy(np.stack([render_subject(base.subject, *s, seed=777_000 + i, size=size)[0]
                                                 for i, s in enumerate(specs)])).permute(0, 3, 1, 2).float() / 255
        grid_cols["render (reference)"] = references
        print(f"untouched teacher on {len(prompts)} test prompts", flush=True)
        imgs = sample(teacher, prompts, noise, args.teacher_steps, args.guidance)
        scores = subject_scores(imgs, specs, evaluator, base.subject)
        rows[f"none / teacher {args.teacher_steps} steps"] = {k: [v] for k, v in scores.items()}
        rows["renders / -"] = {k: [v] for k, v in subject_scores(references, specs, evaluator, base.subject).items()}
        for kind, cfg in configs.items():
            for seed in seeds:
                t0 = time.time()
                teacher = load_teacher(args.teacher)  # fresh weights for every run
                cfg_s = DreamBoothConfig(**{**cfg.__dict__, "seed": seed})
                summary = train_dreambooth(teacher, cfg_s, log=lambda m, s, k=kind, sd=seed: tracker.log_metrics(
                    {f"{k}/seed{sd}/{n}": v for n, v in m.items()}, s))
                n_params[kind] = summary["trainable_params"]
                save_adapter(teacher.denoiser, "subject", out / "adapters" / f"{kind}_seed{seed}.safetensors")
                t_imgs = sample(teacher, prompts, noise, args.teacher_steps, args.guidance)
                student = load_one_step_student(args.student)
                apply_subject_adapter(student, teacher)
                s_imgs = sample(student, prompts, noise, 1, 1.0)
                for sampler, imgs in ((f"teacher {args.teacher_steps} steps", t_imgs), ("student 1 step", s_imgs)):
                    scores = subject_scores(imgs, specs, evaluator, base.subject)
                    for k, v in scores.items():
                        rows.setdefault(f"{kind} / {sampler}", {}).setdefault(k, []).append(v)
                    tracker.log_metrics({f"{kind}/seed{seed}/{sampler.split()[0]}/{k}": v for k, v in scores.items()})
                if seed == seeds[0]:
                    grid_cols[f"{kind} teacher"], grid_cols[f"{kind} student"] = t_imgs, s_imgs
                tracker.log_metrics({f"{kind}/seed{seed}/train_seconds": summary["train_seconds"],
                                     f"{kind}/seed{seed}/run_seconds": time.time() - t0})
                print(f"{kind} seed {seed}: {time.time() - t0:.0f} s, teacher "
                      f"{rows[f'{kind} / teacher {args.teacher_steps} steps']['fidelity'][-1]:.3f} / student "
                      f"{rows[f'{kind} / student 1 step']['fidelity'][-1]:.3f} fidelity", flush=True)
        means = {f"{name.replace(' / ', '/').replace(' ', '_')}/{k}_mean": float(np.mean(v))
                 for name, vals in rows.items() for k, v in vals.items()}
        tracker.log_metrics(means)
        n = min(8, len(prompts))
        pick = np.linspace(0, len(prompts) - 1, n).round().astype(int)
        grid = labelled_grid([c[pick] for c in grid_cols.values()], list(grid_cols),
                             row_labels=[prompts[i].replace("a ", "", 1) for i in pick])
        grid.save(out / "grid.png")
        image_grid(torch.from_numpy(subject.images).permute(0, 3, 1, 2).float() / 255, rows=1).save(
            out / "instances.png")
        table = _table(rows, n_params)
        result = run.finish({"rows": rows, "trainable_params": n_params, "instance_captions": subject.captions,
                             "test_prompts": prompts}, table,
                            files=("grid.png", "instances.png", "metrics.json", "table.md"), folders=("adapters",))
    print(table)
    print(run.where())
    return result


if __name__ == "__main__":
    main()
