"""Single-process WaDi distillation (no Ray): one frozen teacher, LoRaD student + fake score.

    python jobs/distill_local.py                                  # embedded teacher, recipe embedded
    python jobs/distill_local.py --steps 200 vsd.gen_lr=3e-4      # dotted overrides of the recipe's vsd
    python jobs/distill_local.py --teacher /path/to/sd15 --prompts prompts.txt --device cuda
    python jobs/distill_local.py --evaluate 5000 --teacher-report runs/eval_teacher_domain.json \
        --compare-grid docs/images/student_vs_teacher.png         # the issue-4 measurement

Reads the ``teacher`` and ``vsd`` sections of a recipe YAML (the Ray job reads the same file);
the loop's own settings come from the flags. Rerunning with the same --out resumes. Writes
``<out>/metrics.jsonl``, ``samples/``, ``state/`` and ``export/`` (merged one-step pipeline).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_config(args: argparse.Namespace):
    import yaml

    from wadi_core.config import ConfigError, from_dict, unflatten
    from wadi_core.vsd import LocalTrainConfig, VSDConfig

    from pipelines.config import read_recipe  # YAML only: imports neither Ray nor DeepSpeed

    try:
        _, data = read_recipe(args.recipe)
    except ConfigError as e:
        raise SystemExit(str(e)) from e
    vsd = dict(data.get("vsd") or {})
    for item in args.overrides:
        key, _, value = item.partition("=")
        if not key.startswith("vsd.") or not _:
            raise SystemExit(f"override {item!r}: expected vsd.KEY=VALUE")
        node, parts = vsd, key[4:].split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return LocalTrainConfig(
        teacher=args.teacher or data.get("teacher", "embedded"), vsd=from_dict(VSDConfig, unflatten(vsd)),
        steps=args.steps, batch_size=args.batch_size, seed=args.seed, prompts=args.prompts,
        sample_every=args.sample_every, save_every=args.save_every, out_dir=args.out, device=args.device,
        max_minutes=args.max_minutes, max_nonfinite_in_a_row=getattr(args, "max_nonfinite_in_a_row", 5),
        export_live=getattr(args, "export_live", False),
    )


def evaluate(export_dir: Path, teacher_dir: str, n: int, teacher_report: str | None, grid: str | None,
             guidance: float, workers: int) -> dict:
    """Student (1 step, no CFG) vs teacher (25 steps CFG and 1 step CFG), same domain protocol
    as jobs/eval_teacher_domain.py (wadi_core.domain.quality.generated_report)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from wadi_core.domain.evaluator import load_domain_evaluator
    from wadi_core.domain.pretrain import GRID_PROMPTS
    from wadi_core.domain.quality import generated_report, real_feature_stats
    from wadi_core.domain.teacher import image_grid, sample_images
    from wadi_core.models import resolve_teacher_dir

    teacher_dir = str(resolve_teacher_dir(teacher_dir))
    evaluator = load_domain_evaluator()
    real = real_feature_stats(evaluator, n=5000)
    out: dict = {"n": n, "n_real": 5000, "protocol": "wadi_core.domain.quality.generated_report (eval_prompts seed 1)"}
    out["student_1step"], _ = generated_report(str(export_dir), evaluator, real, n, 1, 1.0, workers=workers)
    reused = json.loads(Path(teacher_report).read_text()) if teacher_report else {}
    if reused.get("n") == n and "steps25" in reused and "steps1" in reused:
        out["teacher_25step"], out["teacher_1step"] = reused["steps25"], reused["steps1"]
        out["teacher_source"] = teacher_report
    else:
        out["teacher_25step"], _ = generated_report(teacher_dir, evaluator, real, n, 25, guidance, workers=workers)
        out["teacher_1step"], _ = generated_report(teacher_dir, evaluator, real, n, 1, guidance, workers=workers)
    s, t25, t1 = out["student_1step"], out["teacher_25step"], out["teacher_1step"]
    out["fid_student_over_teacher25"] = s["fid"] / t25["fid"]
    out["fid_teacher1_over_student"] = t1["fid"] / s["fid"]
    out["alignment_student_over_teacher25"] = s["alignment"] / t25["alignment"]
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
        image_grid(tiles, nrow=len(GRID_PROMPTS)).save(grid)
        out["grid"] = grid
        out["grid_layout"] = "rows: prompts; columns: 6 teacher 25-step CFG | 6 student 1-step | 6 teacher 1-step CFG"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", metavar="vsd.KEY=VALUE")
    ap.add_argument("--recipe", default="embedded", help="recipe name in recipes/ or a YAML path")
    ap.add_argument("--teacher", default=None, help="overrides the recipe's teacher")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", default="domain", help="'domain' or a text file with one prompt per line")
    ap.add_argument("--sample-every", type=int, default=250)
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--out", default=str(REPO / "outputs" / "distill_local"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-minutes", type=float, default=0.0, help="stop training after this long (0: off)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--max-nonfinite-in-a-row", type=int, default=5,
                    help="stop after this many VSD steps in a row skipped for a non-finite loss/gradient (0: never)")
    ap.add_argument("--export-live", action="store_true",
                    help="with vsd.student_ema: also export the live student to <out>/export_live")
    ap.add_argument("--evaluate", type=int, default=0, metavar="N", help="domain FID/alignment on N prompts")
    ap.add_argument("--teacher-report", default=None, help="reuse teacher numbers from jobs/eval_teacher_domain.py")
    ap.add_argument("--compare-grid", default=None, help="PNG: teacher 25 steps | student 1 step | teacher 1 step")
    ap.add_argument("--guidance", type=float, default=3.0, help="teacher CFG in the evaluation")
    ap.add_argument("--eval-workers", type=int, default=2, help="sampling processes in the evaluation")
    ap.add_argument("--eval-only", default=None, metavar="EXPORT_DIR", help="skip training; evaluate this export")
    args = ap.parse_args(argv)

    import torch

    from wadi_core.config import to_flat_dict
    from wadi_core.vsd import train_local

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = build_config(args)
    from pipelines.tracking import redact  # no Ray, DeepSpeed or MLflow import

    print(json.dumps(redact(to_flat_dict(cfg)), indent=1), flush=True)  # URI user info hidden
    started = time.time()
    if args.eval_only:
        result: dict = {"export": args.eval_only}
    else:
        result = train_local(cfg)
        result.pop("distiller")
    if args.evaluate:
        result["eval"] = evaluate(Path(result["export"]), cfg.teacher, args.evaluate, args.teacher_report,
                                  args.compare_grid, args.guidance, args.eval_workers)
    result["wall_seconds"] = time.time() - started
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    Path(cfg.out_dir, "result.json" if not args.eval_only else "eval.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
