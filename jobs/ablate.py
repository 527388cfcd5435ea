"""Check WaDi's claims on the embedded domain: adapter ablation, LoRaD rank sweep, weight directions.

    OMP_NUM_THREADS=1 python jobs/ablate.py --budget full seeds=[0,1] workers=2 threads=1 \
        out_dir=runs/ablation docs_images=docs/images docs_md=docs/ABLATION.md   # ~30 min, 2 idle CPUs
    python jobs/ablate.py --budget smoke out_dir=/tmp/ablation_smoke   # CI-sized (seconds)
    python jobs/ablate.py --print-config                                # every key, resolved

Runs, on the embedded teacher with the same VSD recipe and step budget for every student:
a learning-rate sweep per adapter kind (validation prompts/noise, one seed), the adapter comparison
(LoRaD / LoRA / DoRA / full, ``seeds``, test prompts/noise), the swap-norm and
swap-direction students of each full fine-tune, and a LoRaD rank sweep. Writes results.jsonl,
results.csv, summary.csv, ablation.md and PNGs to ``out_dir`` after every run (a cut-off job leaves
a table; rerunning the same command continues). Logs to MLflow (``tracking_uri``,
$MLFLOW_TRACKING_URI, or sqlite under ``out_dir``) unless ``track=false``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from wadi_core.config import base_part, to_flat_dict
from wadi_core.models import resolve_teacher_dir
from wadi_core.redact import redact

from experiments.ablation import BUDGETS, AblationConfig, load_rows, run_ablation, write_report
from pipelines.config.cli import add_config_arguments, config_from_args
from pipelines.config.job import check_adapter_ranks
from pipelines.tracking.client import default_tracking_uri, start_run


@dataclass(frozen=True)
class AblationJob(AblationConfig):
    """``jobs/ablate.py``'s configuration: the study (``AblationConfig``) plus where results go."""

    snapshot: bool = True           # copy the teacher under out_dir first (teacher_manifest.json)
    docs_images: str = ""           # also copy the PNGs here as ablation_*.png
    docs_md: str = ""               # fill the ablation-table block of this markdown file
    tracking_uri: str = ""          # default: $MLFLOW_TRACKING_URI, else sqlite under out_dir
    experiment: str = "wadi-ablation"  # MLflow experiment
    track: bool = True              # false: no MLflow

    def study(self) -> AblationConfig:
        """The study alone: what a rerun must match to continue the same out_dir."""
        return base_part(self, AblationConfig)


#: ``--budget``: named bundles of values, applied under the KEY=VALUE overrides.
PRESETS: dict[str, dict] = {
    "full": {},
    # CI: 2 kinds (+ full for the swaps), 2 ranks, a 1-point lr "sweep"
    "smoke": {"budget": dataclasses.asdict(BUDGETS["smoke"]), "kinds": ["lorad", "lora", "full"], "rank": 4,
              "ranks": [2, 4], "lr_grid": [1e-3], "lr_extend": 0},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, default_recipe="embedded")
    p.add_argument("--budget", choices=sorted(PRESETS), default="full", help="preset of budget and grids")
    p.add_argument("--report-only", action="store_true",
                   help="only rewrite the report (and docs) from out_dir's results.jsonl; trains nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_intermixed_args(argv)  # KEY=VALUE before or after the flags


def build_config(args: argparse.Namespace) -> AblationJob:
    """The recipe's ``teacher`` / ``vsd`` < the ``--budget`` preset < KEY=VALUE overrides."""
    return config_from_args(AblationJob, args, preset=PRESETS[args.budget], check=check_adapter_ranks)


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


def publish(cfg: AblationJob) -> dict:
    """Write the report into out_dir; copy the PNGs to docs_images and the tables into docs_md
    (between the ablation-table markers)."""
    out = Path(cfg.out_dir)
    report = write_report(load_rows(out), cfg)
    if cfg.docs_images:
        dest = Path(cfg.docs_images)
        dest.mkdir(parents=True, exist_ok=True)
        for png in report["plots"]:
            shutil.copy(png, dest / png.name)
        scatter = sorted((out / "weights").glob("full_*_seed0_*/layer_scatter.png"))
        if scatter:
            shutil.copy(scatter[0], dest / "ablation_weights_scatter.png")
    if cfg.docs_md:
        doc = Path(cfg.docs_md)
        text = doc.read_text() if doc.exists() else f"# Ablation\n\n{DOCS_BEGIN}\n{DOCS_END}\n"
        if DOCS_BEGIN not in text or DOCS_END not in text:
            raise SystemExit(f"{doc} has no {DOCS_BEGIN} ... {DOCS_END} block to fill")
        body = report["markdown"].read_text().split("\n", 1)[1].replace("\n## ", "\n### ")
        walls = _invocation_walls(out)
        stamp = f"_Generated {time.strftime('%Y-%m-%d %H:%M')} from `{out}`" + (
            f"; wall time {sum(walls) / 60:.1f} min" + (f" over {len(walls)} invocations (the last "
                                                        f"{walls[-1] / 60:.1f} min)" if len(walls) > 1 else "")
            if walls else "") + "._\n"
        head, rest = text.split(DOCS_BEGIN, 1)
        doc.write_text(head + DOCS_BEGIN + "\n" + stamp + body + "\n" + DOCS_END + rest.split(DOCS_END, 1)[1])
    return report


def _invocation_walls(out: Path) -> list[float]:
    """Wall seconds of every training invocation in ``out`` so far (a cut-off run continued counts twice)."""
    f = out / "wall_time.json"
    if not f.exists():
        return []
    data = json.loads(f.read_text())
    return [float(w) for w in data.get("invocations_s", [data["wall_s"]])]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = build_config(args)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.snapshot:
        cfg = dataclasses.replace(cfg, teacher=snapshot_teacher(cfg.teacher, out))
    started = time.time()
    print(json.dumps(redact(to_flat_dict(cfg)), indent=1), flush=True)  # URI user info hidden

    if args.report_only:
        report = publish(cfg)
        print((out / "ablation.md").read_text())
        return {"rows": load_rows(out), "report": report, "wall_s": 0.0}

    if not cfg.track:
        tracker_cm, factory = contextlib.nullcontext(None), None
    else:

        uri = cfg.tracking_uri or default_tracking_uri(out)
        factory = functools.partial(start_run, cfg.experiment, tracking_uri=uri)
        tracker_cm = factory(run_name=f"ablation-{args.budget}", params=redact(to_flat_dict(cfg)),
                             tags={"budget": args.budget})
    with tracker_cm as tracker:
        try:
            rows = run_ablation(cfg.study(), on_row=_row_logger(factory), progress=not args.quiet)
        finally:
            wall = time.time() - started
            walls = _invocation_walls(out) + [wall]  # a continued run adds its own time to the earlier ones
            (out / "wall_time.json").write_text(json.dumps({"wall_s": wall, "finished": time.time(),
                                                            "invocations_s": walls}, indent=1))
            report = publish(cfg)
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
