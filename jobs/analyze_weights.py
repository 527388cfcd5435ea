"""Compare two checkpoints row by row: norm vs direction change (WaDi's observation, ALGORITHM.md s.1).

    python jobs/analyze_weights.py --reference teacher/unet --candidate student/unet --out runs/analysis \
        [--swap norm|direction] [--swap-out PATH]

Checkpoints are diffusers model dirs (e.g. ``.../unet``), pipeline dirs or ``.safetensors`` files, local or
``s3://``. Writes summary.json, per_layer.csv, layer_scatter.png, histograms.png, svd_energy.png and, with
``--swap``, the candidate with the reference's norms or directions in the candidate's format.
Logs to MLflow when ``MLFLOW_TRACKING_URI`` is set or ``--tracking-uri`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wadi_core.analysis import AnalyzeWeightsConfig, analyze_checkpoints  # noqa: E402
from wadi_core.config import to_flat_dict  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, help="teacher checkpoint (w): dir, .safetensors or s3://")
    p.add_argument("--candidate", required=True, help="student checkpoint (w'): dir, .safetensors or s3://")
    p.add_argument("--out", required=True, help="output dir (local or s3://)")
    p.add_argument("--swap", choices=["norm", "direction"], default=None,
                   help="write the candidate with the reference's row norms / row directions")
    p.add_argument("--swap-out", default=None, help="where the swapped checkpoint goes (default: inside --out)")
    p.add_argument("--svd-fraction", type=float, default=0.3, help="rank fraction for the residual energy")
    p.add_argument("--no-svd", action="store_true", help="skip the residual SVD (faster on big models)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--cache-dir", default=None, help="where s3:// checkpoints are mirrored")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--experiment", default="weight-analysis")
    p.add_argument("--run-name", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = AnalyzeWeightsConfig(
        reference=args.reference, candidate=args.candidate, out=args.out, swap=args.swap, swap_out=args.swap_out,
        svd_fraction=None if args.no_svd else args.svd_fraction, plots=not args.no_plots, cache_dir=args.cache_dir)
    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        summary = analyze_checkpoints(cfg)
    else:
        from pipelines.tracking import start_run

        with start_run(args.experiment, run_name=args.run_name, tracking_uri=tracking_uri,
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
