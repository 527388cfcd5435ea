"""Measure the embedded teacher on its domain: alignment per attribute, domain FID, precision / recall, 25 vs 1 steps.

    python jobs/eval_teacher_domain.py n=5000 out=runs/eval_teacher_domain.json grid=docs/images/teacher_grid.png
    python jobs/eval_teacher_domain.py --print-config

FID uses the domain evaluator's 128-d features against ``n_real`` real renders of the
training combinations; prompts are ``eval_prompts(n, seed=1, split="train")`` (new images of
seen combinations) and ``split="heldout"`` (combinations never trained on).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from wadi_core.domain import TEACHER_GUIDANCE, TEACHER_STEPS
from wadi_core.domain.teacher import sample_images

from pipelines.config.cli import add_config_arguments, config_from_args


@dataclass(frozen=True)
class TeacherEvalJob:
    """``jobs/eval_teacher_domain.py``'s configuration."""

    teacher: str = str(REPO / "wadi_core/assets/embedded_teacher")  # teacher pipeline directory
    evaluator: str = ""             # evaluator dir (default: the shipped one)
    n: int = 5000                   # generated images per setting
    n_real: int = 5000  # real renders in the reference
    n_heldout: int = 600  # held-out-split prompts (attribute combinations never trained on)
    guidance: float = TEACHER_GUIDANCE  # classifier-free guidance scale
    steps: tuple[int, ...] = (TEACHER_STEPS, 1)  # sampling steps, one setting each
    threads: int = 1  # torch threads per process
    workers: int = 2                # sampling processes (one thread each)
    out: str = str(REPO / "runs/eval_teacher_domain.json")  # the report (JSON)
    grid: str = str(REPO / "docs/images/teacher_grid.png")  # sample grid PNG


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    args = config_from_args(TeacherEvalJob, p.parse_intermixed_args(argv))
    import torch  # noqa: PLC0415 -- torch only here: --help stays fast
    from diffusers import StableDiffusionPipeline  # noqa: PLC0415 -- diffusers models: seconds to import

    from wadi_core.domain.evaluator import load_domain_evaluator  # noqa: PLC0415 -- torch only here: --help stays fast
    from wadi_core.domain.pretrain import GRID_PROMPTS  # noqa: PLC0415 -- torch only here: --help stays fast
    from wadi_core.domain.quality import (feature_stats,  # noqa: PLC0415 -- torch only here: --help stays fast
                                          generated_report, real_feature_stats, real_features)
    from wadi_core.images import image_grid  # noqa: PLC0415 -- torch only here: --help stays fast

    torch.set_num_threads(args.threads)
    started = time.time()
    pipe = StableDiffusionPipeline.from_pretrained(args.teacher)
    evaluator = load_domain_evaluator(args.evaluator or None)
    real_f = real_features(evaluator, n=args.n_real)
    real = feature_stats(real_f)
    results: dict = {"teacher": args.teacher, "n": args.n, "n_real": args.n_real, "guidance": args.guidance}
    # Reference: a second set of real renders (other seed) vs the first: the FID floor.
    from wadi_core.metrics import frechet_distance  # noqa: PLC0415 -- torch only here: --help stays fast

    results["fid_real_vs_real"] = float(frechet_distance(real_feature_stats(evaluator, n=args.n_real, seed=778), real))
    for steps in args.steps:
        t0 = time.time()
        rep, _ = generated_report(args.teacher, evaluator, real, args.n, steps, args.guidance, workers=args.workers,
                                  real_feats=real_f)
        rep["sample_wall_s"] = time.time() - t0
        results[f"steps{steps}"] = rep
        print(f"{steps} steps: {rep}", flush=True)
    if args.n_heldout:
        rep, _ = generated_report(args.teacher, evaluator, None, args.n_heldout, args.steps[0], args.guidance,
                                  split="heldout", seed=2, workers=args.workers)
        results[f"heldout_steps{args.steps[0]}"] = rep
        print(f"held-out combinations, {args.steps[0]} steps: {rep}", flush=True)
    if len(args.steps) > 1:
        results["fid_ratio"] = results[f"steps{args.steps[1]}"]["fid"] / results[f"steps{args.steps[0]}"]["fid"]
    if args.grid:
        prompts = [p for p in GRID_PROMPTS for _ in range(8)]
        grid = image_grid(sample_images(pipe, prompts, steps=args.steps[0], guidance=args.guidance, seed=0),
                          rows=len(GRID_PROMPTS))
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        grid.save(args.grid)
        results["grid"] = args.grid
    results["wall_s"] = time.time() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
