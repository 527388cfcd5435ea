"""Quality on the domain: per-attribute alignment, domain FID and precision / recall (evaluator features)."""

from __future__ import annotations

import numpy as np
import torch

from wadi_core.domain.attributes import ATTRIBUTE_NAMES, eval_prompts
from wadi_core.domain.data import make_render_set
from wadi_core.domain.evaluator import DomainEvaluator
from wadi_core.domain.teacher import sample_images_parallel

__all__ = ["real_features", "real_feature_stats", "feature_stats", "alignment_report", "generated_report"]

REAL_SEED = 777


def feature_stats(features: torch.Tensor):
    """Mean and covariance (float64) of evaluator features ``(n, dim)``: what FID compares."""
    from wadi_core.metrics import GaussianStats  # noqa: PLC0415 -- loads scipy (slow), only needed here

    return GaussianStats.from_features(features.double().numpy())


@torch.no_grad()
def real_features(evaluator: DomainEvaluator, n: int = 5000, split: str = "train", seed: int = REAL_SEED,
                  batch: int = 500) -> torch.Tensor:
    """Evaluator features ``(n, dim)`` of ``n`` real renders (combinations of ``split``)."""
    data = make_render_set(n, seed, split)
    x = torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255
    return torch.cat([evaluator.features(x[i:i + batch]) for i in range(0, n, batch)])


def real_feature_stats(evaluator: DomainEvaluator, n: int = 5000, split: str = "train", seed: int = REAL_SEED,
                       batch: int = 500):
    """GaussianStats of evaluator features of ``n`` real renders (combinations of ``split``)."""
    return feature_stats(real_features(evaluator, n, split, seed, batch))


@torch.no_grad()
def alignment_report(evaluator: DomainEvaluator, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """Per-attribute accuracy, mean alignment and all-attributes-right rate of images vs prompts."""
    matches = []
    for i in range(0, len(images), 500):
        matches += evaluator.attribute_matches(images[i:i + 500], prompts[i:i + 500])
    out = {f"acc_{n}": float(np.mean([m[n] for m in matches])) for n in ATTRIBUTE_NAMES}
    out["alignment"] = float(np.mean([np.mean(list(m.values())) for m in matches]))
    out["all_correct"] = float(np.mean([all(m.values()) for m in matches]))
    return out


def generated_report(teacher_dir: str, evaluator: DomainEvaluator, real_stats, n: int, steps: int, guidance: float,
                     split: str = "train", seed: int = 1, workers: int = 1,
                     real_feats: torch.Tensor | None = None) -> tuple[dict[str, float], torch.Tensor]:
    """Sample ``n`` images for ``eval_prompts(n, seed, split)``; alignment, FID vs ``real_stats`` and,
    given the real features themselves (``real_feats``), improved precision / recall (k = 3, the
    evaluation job's setting): FID alone cannot tell a student that misses parts of the real
    distribution from one that draws off it."""
    from wadi_core.metrics import (frechet_distance,  # noqa: PLC0415 -- loads scipy (slow), only needed here
                                   precision_recall)

    prompts = eval_prompts(n, seed=seed, split=split)
    images = sample_images_parallel(teacher_dir, prompts, steps=steps, guidance=guidance, seed=seed, batch=250,
                                    workers=workers)
    report = alignment_report(evaluator, images, prompts)
    if real_stats is not None:
        fake = torch.cat([evaluator.features(images[i:i + 500]) for i in range(0, n, 500)])
        report["fid"] = float(frechet_distance(feature_stats(fake), real_stats))
        if real_feats is not None:
            report.update(precision_recall(real_feats, fake, k=3))
    return report, images
