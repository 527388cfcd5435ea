"""Train the domain evaluator (FID features + per-attribute heads) on fresh renders and save it.

    python jobs/train_domain_evaluator.py --out wadi_core/assets/domain_evaluator
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.tracking import start_run  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "wadi_core/assets/domain_evaluator"))
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--experiment", default="domain-evaluator")
    p.add_argument("--tracking-uri", default=None)
    args = p.parse_args(argv)

    import torch

    from wadi_core.domain.evaluator import render_accuracy, train_domain_evaluator

    torch.set_num_threads(args.threads)
    params = {k: v for k, v in vars(args).items() if k not in ("tracking_uri", "experiment")}
    with start_run(args.experiment, run_name=f"evaluator-seed{args.seed}", tracking_uri=args.tracking_uri,
                   params=params) as tracker:
        model = train_domain_evaluator(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                                       log=tracker.log_metrics)
        acc = render_accuracy(model, n=2000)
        tracker.log_metrics({f"heldout_render_acc/{k}": v for k, v in acc.items()})
        model.save(args.out)
        print(f"saved {args.out}; accuracy on 2000 fresh renders: {acc}")


if __name__ == "__main__":
    main()
