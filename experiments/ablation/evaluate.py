"""Domain evaluation of the ablation: fixed prompts, fixed noise, cached real statistics.

Every run is scored on the same prompts with the same initial noise, so differences between
configurations are paired (they do not include noise-draw luck). FID and improved precision /
recall (k = 3) use the domain evaluator's 128-d features against ``real_images`` renders of the
training combinations.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from wadi_core.domain import eval_prompts
from wadi_core.domain.evaluator import DomainEvaluator
from wadi_core.domain.quality import alignment_report, real_features
from wadi_core.metrics import GaussianStats, frechet_distance, precision_recall
from wadi_core.models import resolve_teacher_dir

__all__ = ["DomainEval", "RealReference", "cached_real", "teacher_pipeline", "teacher_images"]


def features(evaluator: DomainEvaluator, images: Tensor, batch: int = 500) -> Tensor:
    return torch.cat([evaluator.features(images[i:i + batch]) for i in range(0, len(images), batch)])


@dataclass(frozen=True)
class RealReference:
    """Evaluator features of the real renders and their Gaussian statistics."""

    features: Tensor
    stats: GaussianStats

    @classmethod
    def of(cls, feats: Tensor) -> "RealReference":
        return cls(feats, GaussianStats.from_features(feats.double().numpy(), {"extractor": "domain"}))

    def score(self, fake: Tensor) -> dict[str, float]:
        """``fid``, ``precision`` and ``recall`` of ``fake`` features against this reference."""
        stats = GaussianStats.from_features(fake.double().numpy(), {"extractor": "domain"})
        return {"fid": float(frechet_distance(stats, self.stats)), **precision_recall(self.features, fake, k=3)}


def cached_real(evaluator: DomainEvaluator, n: int, seed: int, cache_dir: str | Path) -> RealReference:
    """Evaluator features of ``n`` real renders (``wadi_core.domain.quality``), cached as safetensors."""
    path = Path(cache_dir) / f"real_features_n{n}_seed{seed}.safetensors"
    if path.exists():
        return RealReference.of(load_file(str(path))["features"])
    feats = real_features(evaluator, n=n, split="train", seed=seed).float().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"features": feats}, str(path))
    return RealReference.of(feats)


@dataclass
class DomainEval:
    """One evaluation set: ``prompts`` (domain captions), ``noise`` (N, C, H, W) and the real reference."""

    evaluator: DomainEvaluator
    real: RealReference
    prompts: list[str]
    noise: Tensor
    batch: int = 250

    @classmethod
    def build(cls, evaluator: DomainEvaluator, real: RealReference, n: int, prompt_seed: int, noise_seed: int,
              latent_shape: tuple[int, ...], split: str = "train") -> "DomainEval":
        noise = torch.randn(n, *latent_shape, generator=torch.Generator().manual_seed(noise_seed))
        return cls(evaluator, real, eval_prompts(n, seed=prompt_seed, split=split), noise)

    def __len__(self) -> int:
        return len(self.prompts)

    def score(self, images: Tensor) -> dict[str, float]:
        """``fid``, ``precision`` and ``recall`` vs the real renders, ``alignment`` (mean fraction of
        caption attributes shown) and ``all_correct`` (share of images with every attribute right)."""
        if len(images) != len(self.prompts):
            raise ValueError(f"{len(images)} images for {len(self.prompts)} prompts")
        report = alignment_report(self.evaluator, images, self.prompts)
        return {**self.real.score(features(self.evaluator, images)),
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
    from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: PLC0415 -- diffusers models: seconds to import

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
