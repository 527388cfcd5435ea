"""Single-process WaDi distillation (no Ray): one frozen teacher, LoRaD student + fake score.

    python jobs/distill_local.py                                   # embedded teacher, recipe embedded
    python jobs/distill_local.py steps=200 vsd.gen_lr=3e-4         # dotted overrides, as every job
    python jobs/distill_local.py teacher=/path/to/sd15 prompts=prompts.txt device=cuda --config sd15
    python jobs/distill_local.py --print-config                    # the resolved config
    python jobs/distill_local.py --eval-only runs/distill/export domain_eval.num_prompts=2000 \
        domain_eval.compare_grid=docs/images/student_vs_teacher.png

The config (``DistillLocalJob``) is the loop's ``LocalTrainConfig`` plus ``threads`` and an
``domain_eval`` section; a recipe's ``teacher`` and ``vsd`` sections fill it (the Ray job reads the
same file). Rerunning with the same ``out_dir`` resumes. Writes ``<out_dir>/metrics.jsonl``,
``samples/``, ``state/`` and ``export/`` (merged one-step pipeline).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wadi_core.config import to_flat_dict
from wadi_core.domain import TEACHER_GUIDANCE
from wadi_core.domain.evaluator import load_domain_evaluator
from wadi_core.domain.pretrain import GRID_PROMPTS
from wadi_core.domain.quality import feature_stats, generated_report, real_features
from wadi_core.domain.teacher import sample_images
from wadi_core.images import image_grid
from wadi_core.local_train import LocalTrainConfig, train_local
from wadi_core.models import resolve_teacher_dir
from wadi_core.redact import redact

from pipelines.config.cli import add_config_arguments, config_from_args
from pipelines.config.job import check_adapter_ranks


@dataclass(frozen=True)
class LocalEvaluation:
    """Optional domain evaluation of the export (embedded teacher)."""

    num_prompts: int = 0            # > 0: domain FID / alignment on this many prompts
    teacher_report: str = ""        # reuse teacher numbers from jobs/eval_teacher_domain.py
    compare_grid: str = ""          # PNG: teacher 25 steps | student 1 step | teacher 1 step
    guidance: float = TEACHER_GUIDANCE  # the teacher's classifier-free guidance scale
    workers: int = 2                # sampling processes


@dataclass(frozen=True)
class DistillLocalJob(LocalTrainConfig):
    """``jobs/distill_local.py``'s configuration."""

    steps: int = 1500  # training steps
    batch_size: int = 64  # prompts per step
    save_every: int = 250
    threads: int = 0                # torch threads (0: torch's default)
    domain_eval: LocalEvaluation = field(default_factory=LocalEvaluation)


def evaluate(export_dir: Path, teacher_dir: str, n: int, teacher_report: str | None, grid: str | None,
             guidance: float, workers: int) -> dict:
    """Student (1 step, no CFG) vs teacher (25 steps CFG and 1 step CFG), same domain protocol
    as jobs/eval_teacher_domain.py (wadi_core.domain.quality.generated_report)."""
    from diffusers import StableDiffusionPipeline  # noqa: PLC0415 -- diffusers models: seconds to import

    teacher_dir = str(resolve_teacher_dir(teacher_dir))
    evaluator = load_domain_evaluator()
    real_f = real_features(evaluator, n=5000)
    real = feature_stats(real_f)
    out: dict = {"n": n, "n_real": 5000, "protocol": "wadi_core.domain.quality.generated_report (eval_prompts seed 1)"}
    out["student_1step"], _ = generated_report(str(export_dir), evaluator, real, n, 1, 1.0, workers=workers,
                                               real_feats=real_f)
    reused = json.loads(Path(teacher_report).read_text()) if teacher_report else {}
    if reused.get("n") == n and all("precision" in reused.get(k, {}) for k in ("steps25", "steps1")):
        out["teacher_25step"], out["teacher_1step"] = reused["steps25"], reused["steps1"]
        out["teacher_source"] = teacher_report
    else:  # no report, another n, or one written before precision was measured
        out["teacher_25step"], _ = generated_report(teacher_dir, evaluator, real, n, 25, guidance, workers=workers,
                                                    real_feats=real_f)
        out["teacher_1step"], _ = generated_report(teacher_dir, evaluator, real, n, 1, guidance, workers=workers,
                                                   real_feats=real_f)
    s, t25, t1 = out["student_1step"], out["teacher_25step"], out["teacher_1step"]
    out["fid_student_over_teacher25"] = s["fid"] / t25["fid"]
    out["fid_teacher1_over_student"] = t1["fid"] / s["fid"]
    # The targets of the quality bar (docs/history/QUALITY.md): FID <= 1x, precision and all-four >= 0.9x.
    for key in ("alignment", "precision", "all_correct"):
        out[f"{key}_student_over_teacher25"] = s[key] / max(t25[key], 1e-9)
    if grid:
        student = StableDiffusionPipeline.from_pretrained(export_dir)
        teacher = StableDiffusionPipeline.from_pretrained(teacher_dir)
        prompts = [p for p in GRID_PROMPTS for _ in range(6)]
        rows = [sample_images(teacher, prompts, steps=25, guidance=guidance, seed=0),
                sample_images(student, prompts, steps=1, guidance=1.0, seed=0),
                sample_images(teacher, prompts, steps=1, guidance=guidance, seed=0)]
        # one row per prompt: 6 teacher 25-step | 6 student 1-step | 6 teacher 1-step
        tiles = torch.cat([torch.cat([r[i * 6:(i + 1) * 6] for r in rows]) for i in range(len(GRID_PROMPTS))])
        Path(grid).parent.mkdir(parents=True, exist_ok=True)
        image_grid(tiles, rows=len(GRID_PROMPTS)).save(grid)
        out["grid"] = grid
        out["grid_layout"] = "rows: prompts; columns: 6 teacher 25-step CFG | 6 student 1-step | 6 teacher 1-step CFG"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(ap, default_recipe="embedded")
    ap.add_argument("--eval-only", default=None, metavar="EXPORT_DIR", help="skip training; evaluate this export")
    args = ap.parse_intermixed_args(argv)  # KEY=VALUE before or after the flags
    cfg = config_from_args(DistillLocalJob, args, check=check_adapter_ranks)


    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    print(json.dumps(redact(to_flat_dict(cfg)), indent=1), flush=True)  # URI user info hidden
    started = time.time()
    if args.eval_only:
        result: dict = {"export": args.eval_only}
    else:
        result = train_local(cfg)
        result.pop("distiller")
    ev = cfg.domain_eval
    if ev.num_prompts:
        result["eval"] = evaluate(Path(result["export"]), cfg.teacher, ev.num_prompts, ev.teacher_report or None,
                                  ev.compare_grid or None, ev.guidance, ev.workers)
    result["wall_seconds"] = time.time() - started
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    Path(cfg.out_dir, "result.json" if not args.eval_only else "eval.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
