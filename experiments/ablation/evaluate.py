"""Domain evaluation of the ablation: fixed prompts, fixed noise, cached real statistics.

Every run is scored on the same prompts with the same initial noise, so differences between
configurations are paired (they do not include noise-draw luck). FID uses the domain
evaluator's 128-d features against ``real_images`` renders of the training combinations.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from wadi_core.domain import eval_prompts
from wadi_core.domain.evaluator import DomainEvaluator
from wadi_core.metrics import GaussianStats, frechet_distance

__all__ = ["DomainEval", "cached_real_stats", "teacher_pipeline", "teacher_images"]


def _stats(evaluator: DomainEvaluator, images: Tensor, batch: int = 500) -> GaussianStats:
    feats = torch.cat([evaluator.features(images[i:i + batch]) for i in range(0, len(images), batch)])
    return GaussianStats.from_features(feats, {"extractor": "domain"})


def cached_real_stats(evaluator: DomainEvaluator, n: int, seed: int, cache_dir: str | Path) -> GaussianStats:
    """Evaluator statistics of ``n`` real renders (``wadi_core.domain.quality``), cached as safetensors."""
    from wadi_core.domain.quality import real_feature_stats

    path = Path(cache_dir) / f"real_stats_n{n}_seed{seed}.safetensors"
    if path.exists():
        return GaussianStats.load(path)
    stats = real_feature_stats(evaluator, n=n, split="train", seed=seed)
    stats.save(path)
    return stats


@dataclass
class DomainEval:
    """One evaluation set: ``prompts`` (domain captions), ``noise`` (N, C, H, W) and the real statistics."""

    evaluator: DomainEvaluator
    real: GaussianStats
    prompts: list[str]
    noise: Tensor
    batch: int = 250

    @classmethod
    def build(cls, evaluator: DomainEvaluator, real: GaussianStats, n: int, prompt_seed: int, noise_seed: int,
              latent_shape: tuple[int, ...], split: str = "train") -> "DomainEval":
        noise = torch.randn(n, *latent_shape, generator=torch.Generator().manual_seed(noise_seed))
        return cls(evaluator, real, eval_prompts(n, seed=prompt_seed, split=split), noise)

    def __len__(self) -> int:
        return len(self.prompts)

    def score(self, images: Tensor) -> dict[str, float]:
        """``fid`` vs the real statistics, ``alignment`` (mean fraction of caption attributes shown)
        and ``all_correct`` (share of images with every attribute right)."""
        from wadi_core.domain.quality import alignment_report

        if len(images) != len(self.prompts):
            raise ValueError(f"{len(images)} images for {len(self.prompts)} prompts")
        report = alignment_report(self.evaluator, images, self.prompts)
        return {"fid": float(frechet_distance(_stats(self.evaluator, images), self.real)),
                "alignment": report["alignment"], "all_correct": report["all_correct"]}

    @torch.no_grad()
    def student_images(self, distiller: Any) -> Tensor:
        """1-step images of the distiller's (active, unmerged) student for every prompt."""
        out = [distiller.sample(self.prompts[i:i + self.batch], z=self.noise[i:i + self.batch])
               for i in range(0, len(self), self.batch)]
        return torch.cat(out).float().cpu()

    def score_student(self, distiller: Any) -> dict[str, float]:
        return self.score(self.student_images(distiller))


def teacher_pipeline(teacher_uri: str):
    """The teacher as a StableDiffusionPipeline sampling with DDIM, eta 0, "trailing" spacing
    (the project's protocol: a 1-step sample starts at t = T-1)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from wadi_core.models import resolve_teacher_dir

    pipe = StableDiffusionPipeline.from_pretrained(resolve_teacher_dir(teacher_uri))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def teacher_images(pipe: Any, ev: DomainEval, steps: int, guidance: float) -> Tensor:
    """Teacher samples for ``ev``'s prompts from ``ev``'s noise (paired with the students')."""
    out = []
    for i in range(0, len(ev), ev.batch):
        res = pipe(ev.prompts[i:i + ev.batch], num_inference_steps=steps, guidance_scale=guidance,
                   latents=ev.noise[i:i + ev.batch].to(pipe.unet.dtype), output_type="pt")
        out.append(res.images.float().clamp(0, 1).cpu())
    return torch.cat(out)
