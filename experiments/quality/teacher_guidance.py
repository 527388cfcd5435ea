"""Which guided distribution should the one-step student imitate? The teacher's 25-step sampler with
CFG applied only inside a timestep interval (Kynkaanniemi et al. 2024, "Applying guidance in a limited
interval"), scored with the closing evaluation's protocol (domain features, eval_prompts seed 1,
5,000 real renders).

A diagnostic, not a training path: it tells which target (CFG everywhere, CFG only at low / middle
noise) has the better FID / precision / recall on the embedded domain, so the distillation's
generator-loss guidance can follow it (``vsd.guidance_t_max``).

    python -m experiments.quality.teacher_guidance --n 1000 --variants 3:0:1000 3:0:600 2:0:1000
"""

from __future__ import annotations

import argparse
import json

import torch

from wadi_core.domain.attributes import eval_prompts
from wadi_core.domain.evaluator import load_domain_evaluator
from wadi_core.domain.quality import alignment_report, feature_stats, real_features


def sample_with_interval(pipe, prompts: list[str], w: float, t_lo: int, t_hi: int, seed: int, batch: int = 250,
                         steps: int = 25) -> torch.Tensor:
    """25-step samples with CFG ``w`` for timesteps in ``[t_lo, t_hi]`` and CFG 1 elsewhere (same seeds
    per batch as ``wadi_core.domain.teacher.sample_images``)."""
    one = 1.0 + 1e-9  # > 1 keeps the pipeline's doubled batch; numerically CFG 1

    def scale(t: int) -> float:
        return w if t_lo <= t <= t_hi else one

    def on_step_end(p, i, t, kwargs):
        ts = p.scheduler.timesteps
        if i + 1 < len(ts):
            p._guidance_scale = scale(int(ts[i + 1]))
        return kwargs

    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(steps)
    first = scale(int(pipe.scheduler.timesteps[0]))
    out = []
    for i in range(0, len(prompts), batch):
        g = torch.Generator().manual_seed(seed + i)
        res = pipe(list(prompts[i:i + batch]), num_inference_steps=steps, guidance_scale=first, generator=g,
                   output_type="pt", callback_on_step_end=on_step_end)
        out.append(res.images.float().clamp(0, 1))
    return torch.cat(out)


def main() -> None:
    from diffusers import StableDiffusionPipeline  # noqa: PLC0415 -- diffusers models: seconds to import

    from wadi_core.metrics import (frechet_distance,  # noqa: PLC0415 -- loads scipy (slow), only needed here
                                   precision_recall)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="wadi_core/assets/embedded_teacher")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--variants", nargs="+", default=["3:0:1000", "3:0:600", "2:0:1000"],
                    help="w:t_lo:t_hi, CFG w inside [t_lo, t_hi], 1 outside")
    ap.add_argument("--out", default="runs/teacher_guidance.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(args.teacher)
    evaluator = load_domain_evaluator(None)
    real_f = real_features(evaluator, n=5000)
    real = feature_stats(real_f)
    prompts = eval_prompts(args.n, seed=1, split="train")
    results = {}
    for v in args.variants:
        w, lo, hi = v.split(":")
        images = sample_with_interval(pipe, prompts, float(w), int(lo), int(hi), seed=1)
        feats = torch.cat([evaluator.features(images[i:i + 500]) for i in range(0, len(images), 500)])
        rep = alignment_report(evaluator, images, prompts)
        rep["fid"] = float(frechet_distance(feature_stats(feats), real))
        rep.update(precision_recall(real_f, feats, k=3))
        results[v] = rep
        print(v, {k: round(x, 4) for k, x in rep.items() if k in ("fid", "precision", "recall", "all_correct")},
              flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
