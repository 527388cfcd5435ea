"""Weight-free extractor and scorer for smoke tests and CI (not a benchmark metric)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ThumbnailExtractor", "MeanIntensityScorer"]


class ThumbnailExtractor:
    """Features = the image average-pooled to ``size`` x ``size`` (3 * size^2 values)."""

    name = "thumbnail"
    sha256 = "none"

    def __init__(self, size: int = 4):
        self.size = size
        self.feature_dim = 3 * size * size

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images.float(), self.size).flatten(1)


class MeanIntensityScorer:
    """Score = mean pixel intensity (ignores the prompt): exercises the scorer code path."""

    name = "mean_intensity"

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        return images.float().mean(dim=(1, 2, 3))
