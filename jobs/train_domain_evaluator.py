"""Train the domain evaluator (FID features + per-attribute heads) on fresh renders and save it.

    python jobs/train_domain_evaluator.py out=wadi_core/assets/domain_evaluator
    python jobs/train_domain_evaluator.py --print-config
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from pipelines.config.cli import add_config_arguments, config_from_args
from pipelines.tracking.client import start_run


@dataclass(frozen=True)
class EvaluatorJob:
    """``jobs/train_domain_evaluator.py``'s configuration."""

    out: str = str(REPO / "wadi_core/assets/domain_evaluator")  # where the evaluator is written
    steps: int = 1000  # training steps
    batch: int = 64  # renders per step
    lr: float = 2e-3  # learning rate
    seed: int = 0  # seed of the renders and the init
    threads: int = 1  # torch threads
    experiment: str = "domain-evaluator"  # MLflow experiment
    tracking_uri: str = ""  # MLflow tracking URI ("": MLFLOW_TRACKING_URI, else sqlite ./mlflow.db)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    args = config_from_args(EvaluatorJob, p.parse_intermixed_args(argv))

    import torch  # noqa: PLC0415 -- torch only here: --help stays fast

    from wadi_core.domain.evaluator import (render_accuracy,  # noqa: PLC0415 -- torch only here: --help stays fast
                                            train_domain_evaluator)

    torch.set_num_threads(args.threads)
    params = {k: v for k, v in dataclasses.asdict(args).items() if k not in ("tracking_uri", "experiment")}
    with start_run(args.experiment, run_name=f"evaluator-seed{args.seed}", tracking_uri=args.tracking_uri or None,
                   params=params) as tracker:
        model = train_domain_evaluator(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                                       log=tracker.log_metrics)
        acc = render_accuracy(model, n=2000)
        tracker.log_metrics({f"heldout_render_acc/{k}": v for k, v in acc.items()})
        model.save(args.out)
        print(f"saved {args.out}; accuracy on 2000 fresh renders: {acc}")


if __name__ == "__main__":
    main()
