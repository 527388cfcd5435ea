"""Check WaDi's claims on the embedded domain: adapter ablation, LoRaD rank sweep, weight directions.

    OMP_NUM_THREADS=1 python jobs/ablate.py --budget full --seeds 2 --workers 2 --threads 1 \
        --out runs/ablation --docs-images docs/images --docs-md docs/ABLATION.md   # ~30 min, 2 idle CPUs
    python jobs/ablate.py --budget smoke --out /tmp/ablation_smoke   # CI-sized (seconds)

Runs, on the embedded teacher with the same VSD recipe and step budget for every student:
a learning-rate sweep per adapter kind (validation prompts/noise, one seed), the adapter comparison
(LoRaD / LoRA / DoRA / full, ``--seeds`` seeds, test prompts/noise), the swap-norm and
swap-direction students of each full fine-tune, and a LoRaD rank sweep. Writes results.jsonl,
results.csv, summary.csv, ablation.md and PNGs to --out after every run (a cut-off job leaves a
table; rerunning the same command continues). Logs to MLflow (--tracking-uri, $MLFLOW_TRACKING_URI,
or sqlite under --out) unless --no-tracking.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wadi_core.ablation import BUDGETS, AblationConfig, load_rows, run_ablation, write_report  # noqa: E402
from wadi_core.config import to_flat_dict  # noqa: E402

from pipelines.tracking import redact  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    p.add_argument("--seeds", type=int, default=2, help="seeds per configuration (0, 1, ...)")
    p.add_argument("--out", default=str(REPO / "runs" / "ablation"))
    p.add_argument("--teacher", default="embedded", help="diffusers dir, s3:// prefix or 'embedded'")
    p.add_argument("--recipe", default="embedded",
                   help="recipe whose vsd section every run uses (student kind/rank/lr are the ablated part)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--workers", type=int, default=1,
                   help="parallel single-run processes (2 x 1 thread beats 1 x 2 threads on a shared 2-core box)")
    p.add_argument("--kinds", nargs="+", default=None, help="student adapter kinds (default: all four)")
    p.add_argument("--rank", type=int, default=None, help="student rank of the adapter comparison")
    p.add_argument("--ranks", type=int, nargs="+", default=None, help="LoRaD rank sweep")
    p.add_argument("--lr-grid", type=float, nargs="+", default=None, help="learning rates tried for every kind")
    p.add_argument("--fixed-lr", nargs="*", default=[], metavar="KIND=LR", help="skip the sweep for these kinds")
    p.add_argument("--steps", type=int, default=None, help="override the budget's steps per run")
    p.add_argument("--sweep-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--eval-images", type=int, default=None)
    p.add_argument("--no-swaps", action="store_true")
    p.add_argument("--no-snapshot", action="store_true",
                   help="use the teacher in place instead of a copy under --out (teacher_manifest.json)")
    p.add_argument("--docs-images", default=None, help="also copy the PNGs here as ablation_*.png")
    p.add_argument("--docs-md", default=None, help="fill the ablation-table block of this markdown file")
    p.add_argument("--report-only", action="store_true",
                   help="only rewrite the report (and docs) from --out's results.jsonl; trains nothing")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--no-tracking", action="store_true")
    p.add_argument("--experiment", default="wadi-ablation")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def recipe_vsd(recipe: str):
    """The ``vsd`` section of a recipe (name in recipes/ or a YAML path) as a VSDConfig."""
    from wadi_core.config import ConfigError, from_dict
    from wadi_core.vsd import VSDConfig

    from pipelines.config import read_recipe

    try:
        _, data = read_recipe(recipe)
    except ConfigError as e:
        raise SystemExit(str(e)) from e
    return from_dict(VSDConfig, data.get("vsd") or {})


def build_config(args: argparse.Namespace) -> AblationConfig:
    budget = BUDGETS[args.budget]
    over = {k: v for k, v in {"steps": args.steps, "sweep_steps": args.sweep_steps, "batch_size": args.batch_size,
                              "eval_images": args.eval_images}.items() if v is not None}
    budget = dataclasses.replace(budget, **over)
    vsd = recipe_vsd(args.recipe)
    defaults = AblationConfig(vsd=vsd, rank=vsd.student.rank)
    if args.budget == "smoke":  # CI: 2 kinds (+ full for the swaps), 2 ranks, a 1-point lr "sweep"
        defaults = dataclasses.replace(defaults, kinds=("lorad", "lora", "full"), rank=4, ranks=(2, 4),
                                       lr_grid=(1e-3,), lr_extend=0)
    fixed = []
    for item in args.fixed_lr:
        kind, _, lr = item.partition("=")
        if not _:
            raise SystemExit(f"--fixed-lr {item!r}: expected KIND=LR, e.g. full=1e-4")
        fixed.append((kind, float(lr)))
    if args.seeds < 1:
        raise SystemExit("--seeds must be >= 1 (the issue asks for >= 2)")
    return dataclasses.replace(
        defaults, teacher=args.teacher, budget=budget, seeds=tuple(range(args.seeds)),
        kinds=tuple(args.kinds or defaults.kinds), rank=args.rank or defaults.rank,
        ranks=tuple(args.ranks or defaults.ranks), lr_grid=tuple(args.lr_grid or defaults.lr_grid),
        fixed_lrs=tuple(fixed), swaps=not args.no_swaps, out_dir=str(args.out), threads=args.threads,
        workers=args.workers)


_PARAM_KEYS = ("name", "group", "variant", "kind", "rank", "lr", "seed", "steps", "evalset", "batch_size", "source")


def _row_logger(tracker_factory):
    """on_row callback: refresh the report files, log one nested MLflow run per row."""

    last_plot = [0.0]

    def on_row(row: dict, cfg: AblationConfig) -> None:
        # Tables after every row; plots at most every 30 s (they cost more than a smoke run's row).
        plots = time.time() - last_plot[0] > 30
        write_report(load_rows(cfg.out_dir), cfg, plots=plots)
        if plots:
            last_plot[0] = time.time()
        if tracker_factory is None:
            return
        params = {k: row[k] for k in _PARAM_KEYS if k in row}
        metrics = {k: v for k, v in row.items() if k not in _PARAM_KEYS and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)}
        with tracker_factory(run_name=row["name"], params=params, nested=True) as child:
            child.log_metrics(metrics)

    return on_row


def snapshot_teacher(uri: str, out: Path) -> str:
    """Copy the teacher into ``out/teacher_snapshot`` (once) and record its files' sha256, so a
    teacher retrained while the job runs (or before a rerun continues it) cannot mix into the table."""
    import hashlib

    from wadi_core.models import resolve_teacher_dir

    dest = out / "teacher_snapshot"
    if not dest.exists():
        src = resolve_teacher_dir(uri)
        shutil.copytree(src, dest)
        files = sorted(p for p in dest.rglob("*") if p.is_file())
        manifest = {"source": uri, "resolved": str(src), "copied": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "sha256": {str(p.relative_to(dest)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}}
        (out / "teacher_manifest.json").write_text(json.dumps(manifest, indent=1))
    return str(dest.resolve())


DOCS_BEGIN, DOCS_END = "<!-- ablation-table:begin -->", "<!-- ablation-table:end -->"


def publish(cfg: AblationConfig, args: argparse.Namespace) -> dict:
    """Write the report into --out; copy the PNGs to --docs-images and the tables into --docs-md
    (between the ablation-table markers)."""
    out = Path(cfg.out_dir)
    report = write_report(load_rows(out), cfg)
    if args.docs_images:
        dest = Path(args.docs_images)
        dest.mkdir(parents=True, exist_ok=True)
        for png in report["plots"]:
            shutil.copy(png, dest / png.name)
        scatter = sorted((out / "weights").glob("full_*_seed0_*/layer_scatter.png"))
        if scatter:
            shutil.copy(scatter[0], dest / "ablation_weights_scatter.png")
    if args.docs_md:
        doc = Path(args.docs_md)
        text = doc.read_text() if doc.exists() else f"# Ablation\n\n{DOCS_BEGIN}\n{DOCS_END}\n"
        if DOCS_BEGIN not in text or DOCS_END not in text:
            raise SystemExit(f"{doc} has no {DOCS_BEGIN} ... {DOCS_END} block to fill")
        body = report["markdown"].read_text().split("\n", 1)[1].replace("\n## ", "\n### ")
        wall = json.loads((out / "wall_time.json").read_text())["wall_s"] if (out / "wall_time.json").exists() else None
        stamp = f"_Generated {time.strftime('%Y-%m-%d %H:%M')} from `{out}`" + (
            f"; wall time of the last invocation {wall / 60:.1f} min" if wall else "") + "._\n"
        head, rest = text.split(DOCS_BEGIN, 1)
        doc.write_text(head + DOCS_BEGIN + "\n" + stamp + body + "\n" + DOCS_END + rest.split(DOCS_END, 1)[1])
    return report


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_snapshot:
        args.teacher = snapshot_teacher(args.teacher, out)
    cfg = build_config(args)
    started = time.time()
    print(json.dumps(redact(to_flat_dict(cfg)), indent=1), flush=True)  # URI user info hidden

    if args.report_only:
        report = publish(cfg, args)
        print((out / "ablation.md").read_text())
        return {"rows": load_rows(out), "report": report, "wall_s": 0.0}

    import contextlib

    if args.no_tracking:
        tracker_cm, factory = contextlib.nullcontext(None), None
    else:
        import functools

        from pipelines.tracking import default_tracking_uri, start_run

        uri = args.tracking_uri or default_tracking_uri(out)
        factory = functools.partial(start_run, args.experiment, tracking_uri=uri)
        tracker_cm = factory(run_name=f"ablation-{args.budget}", params=to_flat_dict(cfg),
                             tags={"issue": 8, "budget": args.budget})
    with tracker_cm as tracker:
        try:
            rows = run_ablation(cfg, on_row=_row_logger(factory), progress=not args.quiet)
        finally:
            wall = time.time() - started
            (out / "wall_time.json").write_text(json.dumps({"wall_s": wall, "finished": time.time()}, indent=1))
            report = publish(cfg, args)
            if tracker is not None:
                tracker.log_metrics({"wall_s": wall})
                for key in ("results_csv", "summary_csv", "markdown"):
                    tracker.log_artifact(report[key], "ablation")
                for png in report["plots"]:
                    tracker.log_artifact(png, "ablation")
                if (out / "weights").exists():
                    tracker.log_artifacts(out / "weights", "ablation/weights")
    print((out / "ablation.md").read_text())
    print(f"wall time: {wall / 60:.1f} min; outputs in {out}")
    return {"rows": rows, "report": report, "wall_s": wall}


if __name__ == "__main__":
    main()
