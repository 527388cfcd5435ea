"""Compare two checkpoints row by row: norm vs direction change (WaDi's observation, arXiv 2603.08258).

    python jobs/analyze_weights.py reference=teacher/unet candidate=student/unet out=runs/analysis \
        [swap=norm|direction] [swap_out=PATH] [svd_fraction=null] [plots=false]
    python jobs/analyze_weights.py --print-config reference=a candidate=b out=c

Checkpoints are diffusers model dirs (e.g. ``.../unet``), pipeline dirs or ``.safetensors`` files, local or
``s3://``. Writes summary.json, per_layer.csv, layer_scatter.png, histograms.png, svd_energy.png and, with
``swap``, the candidate with the reference's norms or directions in the candidate's format.
Logs to MLflow when ``MLFLOW_TRACKING_URI`` is set or ``tracking_uri`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

from wadi_core.analysis import AnalyzeWeightsConfig, analyze_checkpoints
from wadi_core.config import base_part, to_flat_dict

from pipelines.config.cli import add_config_arguments, config_from_args
from pipelines.tracking.client import start_run


@dataclass(frozen=True)
class AnalyzeWeightsJob(AnalyzeWeightsConfig):
    """The analysis (``reference``, ``candidate``, ``out`` are required) plus MLflow settings."""

    tracking_uri: str = ""          # default: $MLFLOW_TRACKING_URI (none: no tracking)
    experiment: str = "weight-analysis"  # MLflow experiment
    run_name: str = ""  # MLflow run name ("": MLflow's)

    def analysis(self) -> AnalyzeWeightsConfig:
        return base_part(self, AnalyzeWeightsConfig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> dict:
    job = config_from_args(AnalyzeWeightsJob, parse_args(argv))
    cfg = job.analysis()
    tracking_uri = job.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        summary = analyze_checkpoints(cfg)
    else:
        with start_run(job.experiment, run_name=job.run_name or None, tracking_uri=tracking_uri,
                       params=to_flat_dict(cfg)) as tracker:
            summary = analyze_checkpoints(cfg, on_written=lambda d: tracker.log_artifacts(d, "analysis"))
            tracker.log_metrics({k: v for k, v in summary.items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool)})
    keys = ("layers", "norm_change_mean_pct", "norm_change_std_pct", "direction_change_mean_pct",
            "direction_change_std_pct", "direction_to_norm_ratio", "svd_energy_kept_mean", "swap_out")
    print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2))
    return summary


if __name__ == "__main__":
    main()
