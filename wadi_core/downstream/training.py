"""Pieces every downstream fine-tuning shares: the teacher's epsilon loss with its Min-SNR
weighting, timestep sampling, and batched VAE encoding of renders."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from wadi_core.models.teacher import Cond, Teacher

__all__ = ["snr_weight", "eps_loss", "encode_renders", "focal_timesteps"]


def snr_weight(model: Teacher, gamma: float) -> Tensor:
    """Min-SNR-gamma weights per timestep for epsilon prediction (the embedded teacher's own
    pretraining weighting): min(SNR, gamma) / SNR; all ones for gamma <= 0."""
    abar = model.alphas_cumprod
    snr = abar / (1 - abar)
    return snr.clamp(max=gamma) / snr if gamma > 0 else torch.ones_like(snr)


def focal_timesteps(n: int, num_train_timesteps: int, alpha: float, gen: torch.Generator) -> Tensor:
    """Timesteps drawn with density (1 - alpha cos(pi t / T)) / T: ``alpha`` > 0 puts more weight on
    high (noisy) t, where layout and relations are decided (ReVersion's relation-focal sampling)."""
    t = torch.arange(num_train_timesteps, dtype=torch.float64)
    p = 1 - alpha * torch.cos(torch.pi * t / num_train_timesteps)
    return torch.multinomial(p / p.sum(), n, replacement=True, generator=gen)


def eps_loss(model: Teacher, latents: Tensor, cond: Cond, weight: Tensor, gen: torch.Generator,
             t: Tensor | None = None) -> Tensor:
    """Weighted epsilon-prediction loss of the model's active denoiser on clean ``latents``
    (t uniform unless given)."""
    noise = torch.randn(latents.shape, generator=gen).to(latents)
    if t is None:
        t = torch.randint(0, model.num_train_timesteps, (latents.shape[0],), generator=gen)
    t = t.to(latents.device)
    abar = model.alphas_cumprod.to(latents.device)[t].view(-1, 1, 1, 1)
    eps = model.predict_eps(abar.sqrt() * latents + (1 - abar).sqrt() * noise, t, cond)
    return (((eps.float() - noise.float()) ** 2).mean(dim=(1, 2, 3)) * weight.to(latents.device)[t]).mean()


@torch.no_grad()
def encode_renders(model: Teacher, images: np.ndarray, batch: int = 256) -> Tensor:
    """uint8 (N, H, W, 3) renders -> scaled VAE latents (posterior mean)."""
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2).float().div(255).to(model.device, model.dtype)
        out.append(model.encode_images(x))
    return torch.cat(out)
