"""Compare the runs of MLflow experiments: a markdown table, a CSV and a PNG plot of their metrics.

    python jobs/compare_runs.py experiments=[wadi-eval] out=docs/images/compare_runs
    python jobs/compare_runs.py experiments=[wadi-eval,wadi-distill] metrics=[fid,alignment,precision,recall] \\
        "filter=tags.\\`wadi.kind\\` = 'evaluation'"

Writes ``<out>.md``, ``<out>.csv`` and ``<out>.png`` (one panel per metric, one bar per run).
"""

from __future__ import annotations

import argparse
import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config.cli import add_config_arguments, config_from_args
from pipelines.tracking.client import default_tracking_uri, redact_uri

DEFAULT_METRICS = ("fid", "precision", "recall", "alignment", "clip_score", "hpsv2")
COLUMNS = ("run", "run_id", "model", "steps", "guidance", "checkpoint")


def search_all_runs(client: Any, experiment_ids: list[str], filter_string: str = "",
                    order_by: list[str] | None = None, page_size: int = 1000) -> list[Any]:
    """Every matching run, page by page (a tracking server returns at most 1000 runs per call;
    ``page_token`` continues where the last page ended)."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, order_by=order_by,
                                  max_results=page_size, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def fetch_runs(experiments: list[str], tracking_uri: str | None, filter_string: str = "",
               page_size: int = 1000) -> list[dict[str, Any]]:
    """One dict per run: identity columns plus all its metrics, oldest first."""
    import mlflow  # noqa: PLC0415 -- MLflow is optional and slow to import

    client = mlflow.MlflowClient(tracking_uri or default_tracking_uri(Path.cwd() / "runs"))
    ids = []
    for name in experiments:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise SystemExit(f"no MLflow experiment named {name!r} at {redact_uri(client.tracking_uri)}")
        ids.append(exp.experiment_id)
    # run_id breaks ties of start_time, so that pages never repeat or skip a run
    runs = search_all_runs(client, ids, filter_string, ["attributes.start_time ASC", "attributes.run_id ASC"],
                           page_size)
    rows = []
    for r in runs:
        p, t = r.data.params, r.data.tags
        rows.append({
            "run": r.info.run_name, "run_id": r.info.run_id[:8],
            "model": p.get("model.uri", t.get("wadi.model_uri", "")),
            "steps": p.get("model.steps", ""), "guidance": p.get("model.guidance", ""),
            "checkpoint": t.get("wadi.checkpoint_id", ""), **r.data.metrics,
        })
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_table(rows: list[dict[str, Any]], metrics: list[str], out: Path) -> None:
    cols = list(COLUMNS) + metrics
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    out.with_suffix(".csv").write_text(buf.getvalue())


def plot(rows: list[dict[str, Any]], metrics: list[str], out: Path) -> None:
    import matplotlib  # noqa: PLC0415 -- matplotlib only for a figure (slow import)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 -- matplotlib only for a figure (slow import)

    labels = [f"{r['run']}" for r in rows]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 0.45 * len(rows) + 1.8), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        values = [float(r.get(m, float("nan"))) for r in rows]
        ax.barh(range(len(rows)), values, color="tab:blue")
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(labels if ax is axes[0][0] else [""] * len(rows), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(m + (" (lower is better)" if m == "fid" else ""))
        for i, v in enumerate(values):
            if v == v:  # not NaN
                ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)


@dataclass(frozen=True)
class CompareRunsJob:
    """``jobs/compare_runs.py``'s configuration."""

    experiments: tuple[str, ...] = ("wadi-eval",)  # MLflow experiments whose runs are compared
    tracking_uri: str = ""           # default: $MLFLOW_TRACKING_URI, else sqlite under ./runs
    metrics: tuple[str, ...] = ()    # default: those of DEFAULT_METRICS present
    filter: str = ""                 # MLflow filter string
    page_size: int = 1000            # runs per search request (server maximum 1000)
    out: str = "outputs/compare_runs"  # path without extension

    def __post_init__(self) -> None:
        if not 1 <= self.page_size <= 1000:
            raise ValueError(f"page_size must be 1..1000, got {self.page_size}")
        if not self.experiments:
            raise ValueError("experiments must name at least one MLflow experiment")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    cfg = config_from_args(CompareRunsJob, p.parse_intermixed_args(argv))
    rows = fetch_runs(list(cfg.experiments), cfg.tracking_uri or None, cfg.filter, cfg.page_size)
    if not rows:
        raise SystemExit("no runs matched")
    metrics = list(cfg.metrics) or [m for m in DEFAULT_METRICS if any(m in r for r in rows)]
    if not metrics:
        raise SystemExit(f"the runs have none of the metrics {DEFAULT_METRICS}: pass metrics=[...]")
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_table(rows, metrics, out)
    plot(rows, metrics, out)
    print(out.with_suffix(".md").read_text())
    print(f"wrote {out.with_suffix('.md')}, {out.with_suffix('.csv')}, {out.with_suffix('.png')}")
    return rows


if __name__ == "__main__":
    main()
