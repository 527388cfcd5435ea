"""The maths of VSD / DMD2 as pure tensor functions (WaDi, arXiv 2603.08258; DMD2, arXiv 2405.14867).

Shapes: latents (B, C, H, W); ``abar_t`` is alphabar at each sample's timestep, shape (B,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["at_least_fp32", "expand_like", "x0_from_eps", "add_noise", "cfg_combine", "guidance_in_interval",
           "vsd_gradient",
           "dmd2_gradient", "generator_loss", "fake_score_loss"]


def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in fp32, or kept in float64 (half-precision outputs are upcast before any maths)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def expand_like(v: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, ...) matching ``x``'s rank."""
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(device=x.device)


def _abar(abar_t: Tensor, x: Tensor) -> Tensor:
    # at least fp32: alphabar_999 = 0.0047 loses digits in half precision
    return expand_like(abar_t, x).to(torch.promote_types(x.dtype, torch.float32))


def x0_from_eps(x_t: Tensor, eps: Tensor, abar_t: Tensor) -> Tensor:
    """x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    abar = _abar(abar_t, x_t)
    return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()


def add_noise(x0: Tensor, eps: Tensor, abar_t: Tensor) -> Tensor:
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) eps (the forward process)."""
    abar = _abar(abar_t, x0)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps


def cfg_combine(e_uncond: Tensor, e_cond: Tensor, scale: float | Tensor) -> Tensor:
    """Classifier-free guidance: e_u + w (e_c - e_u); ``scale`` a number or one per sample, shape (B,)."""
    if isinstance(scale, Tensor):
        scale = expand_like(scale, e_cond).to(e_cond.dtype)
    return e_uncond + scale * (e_cond - e_uncond)


def guidance_in_interval(scale: float, t: Tensor, t_max: int) -> float | Tensor:
    """Per-sample CFG scale: ``scale`` where ``t <= t_max``, 1 (no guidance) above it; the plain
    number when every sample is inside (guidance in a limited interval, Kynkaanniemi et al. 2024)."""
    if scale == 1.0 or bool((t <= t_max).all()):
        return scale
    return torch.where(t <= t_max, torch.full_like(t, scale, dtype=torch.float32), torch.ones_like(t, dtype=torch.float32))


def vsd_gradient(e_real: Tensor, e_fake: Tensor, abar_t: Tensor) -> Tensor:
    """WaDi/VSD: g = nan_to_num((1 - abar_t) (e_real - e_fake)), i.e. sigma_t^2-weighted score gap."""
    return torch.nan_to_num((1 - expand_like(abar_t, e_real)) * (e_real - e_fake))


def dmd2_gradient(x0: Tensor, x_t: Tensor, e_real: Tensor, e_fake: Tensor, abar_t: Tensor) -> Tensor:
    """DMD2: g = (p_real - p_fake) / mean|p_real| with p = x0 - x0_pred (mean per sample)."""
    p_real = x0 - x0_from_eps(x_t, e_real, abar_t)
    p_fake = x0 - x0_from_eps(x_t, e_fake, abar_t)
    norm = p_real.abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
    return torch.nan_to_num((p_real - p_fake) / norm)


def generator_loss(x0: Tensor, g: Tensor) -> Tensor:
    """0.5 * mse(x0, stopgrad(x0 - g)): its gradient w.r.t. x0 is exactly g / numel."""
    x0 = at_least_fp32(x0)
    return 0.5 * F.mse_loss(x0, (x0 - g.to(x0.dtype)).detach())


def fake_score_loss(e_fake: Tensor, eps: Tensor, abar_t: Tensor) -> Tensor:
    """mse(sqrt(abar_t) e_fake, sqrt(abar_t) eps): the fake score's denoising loss, per-sample weight abar_t.

    The official code multiplies both sides by ``alpha_t = alphas_cumprod[t] ** 0.5``, so the
    squared error is weighted by abar_t (not abar_t^2): high-noise timesteps still train.
    """
    e_fake, eps = at_least_fp32(e_fake), at_least_fp32(eps)
    w = expand_like(abar_t, eps).to(eps.dtype).sqrt()
    return F.mse_loss(w * e_fake, w * eps)
