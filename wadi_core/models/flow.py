"""Rectified-flow teachers as VP models in disguise: exact conversions in fp32, and their sampler
(docs/ARCHITECTURE.md, "Flow-matching teachers").

A flow teacher diffuses x_s = (1 - s) x0 + s eps and predicts the velocity v = eps - x0. Dividing by
c(s) = sqrt((1 - s)^2 + s^2) gives a variance-preserving latent

    x_vp = x_s / c = sqrt(abar) x0 + sqrt(1 - abar) eps,   abar(s) = (1 - s)^2 / ((1 - s)^2 + s^2),

with the same x0 and eps. So a flow teacher answers the VP eps interface exactly (``Teacher.predict_eps``):
x_s = c x_vp, v = model(x_s, s), eps = x_s + (1 - s) v, and the VSD / DMD2 losses of
``wadi_core.vsd.losses`` apply unchanged with abar(s). Shapes: latents (B, C, H, W); ``sigma`` (B,).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["FLOW_SCHEDULERS", "is_flow_scheduler", "flow_sigmas_of", "flow_grid_sigmas", "flow_alphas_cumprod",
           "vp_scale", "flow_from_vp", "vp_from_flow", "add_flow_noise", "eps_from_velocity", "x0_from_velocity",
           "velocity_from_eps", "sample_flow"]


def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in fp32, or kept in float64 (as ``wadi_core.vsd.losses.at_least_fp32``)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def expand_like(v: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, ...) matching ``x``'s rank."""
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(device=x.device)


def flow_grid_sigmas(num_train_timesteps: int, shift: float) -> Tensor:
    """sigma_t for t = 0..T-1 (ascending; sigma_{T-1} = 1), float64: the training grid of diffusers'
    ``FlowMatchEulerDiscreteScheduler``, s = (t + 1) / T shifted to shift s / (1 + (shift - 1) s)."""
    s = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    return shift * s / (1 + (shift - 1) * s)


#: Schedulers whose teacher predicts the rectified-flow velocity v = eps - x0.
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)


def is_flow_scheduler(scheduler: Any) -> bool:
    """True for a rectified-flow scheduler (the teacher predicts the velocity)."""
    return type(scheduler).__name__ in FLOW_SCHEDULERS


def flow_sigmas_of(scheduler: Any) -> Tensor:
    """The flow scheduler's training grid sigma_t, t = 0..T-1 ascending (float64; ``shift`` applied)."""
    cfg = scheduler.config
    if cfg.get("use_dynamic_shifting", False):
        raise ValueError("this flow scheduler shifts its sigmas by image resolution (use_dynamic_shifting=True), "
                         "which has no fixed training grid: set use_dynamic_shifting=false and a fixed shift in the "
                         "teacher's scheduler/scheduler_config.json")
    return flow_grid_sigmas(int(cfg.num_train_timesteps), float(cfg.get("shift", 1.0)))


def flow_alphas_cumprod(sigmas: Tensor) -> Tensor:
    """The VP alphabar of each flow noise level: (1 - s)^2 / ((1 - s)^2 + s^2), float64 (0 at s = 1)."""
    s = sigmas.to(torch.float64)
    return (1 - s) ** 2 / ((1 - s) ** 2 + s ** 2)


def _sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """``sigma`` as (B, 1, ...) in at least fp32, on ``x``'s device."""
    sigma = torch.as_tensor(sigma, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return expand_like(sigma, x).to(torch.promote_types(x.dtype, torch.float32))


def vp_scale(sigma: Tensor) -> Tensor:
    """c(s) = sqrt((1 - s)^2 + s^2): x_s = c x_vp."""
    return ((1 - sigma) ** 2 + sigma ** 2).sqrt()


def flow_from_vp(x_vp: Tensor, sigma: Tensor | float) -> Tensor:
    """x_s = c(s) x_vp (fp32)."""
    x = at_least_fp32(x_vp)
    return vp_scale(_sigma(sigma, x)) * x


def vp_from_flow(x_s: Tensor, sigma: Tensor | float) -> Tensor:
    """x_vp = x_s / c(s) (fp32)."""
    x = at_least_fp32(x_s)
    return x / vp_scale(_sigma(sigma, x))


def add_flow_noise(x0: Tensor, eps: Tensor, sigma: Tensor | float) -> Tensor:
    """x_s = (1 - s) x0 + s eps (the rectified-flow forward process, fp32)."""
    x0, eps = at_least_fp32(x0), at_least_fp32(eps)
    s = _sigma(sigma, x0)
    return (1 - s) * x0 + s * eps


def eps_from_velocity(x_s: Tensor, v: Tensor, sigma: Tensor | float) -> Tensor:
    """eps = x_s + (1 - s) v (fp32; exact at every s, also s = 1 where eps = x_s)."""
    x_s, v = at_least_fp32(x_s), at_least_fp32(v)
    return x_s + (1 - _sigma(sigma, x_s)) * v


def x0_from_velocity(x_s: Tensor, v: Tensor, sigma: Tensor | float) -> Tensor:
    """x0 = x_s - s v (fp32): the one-step generator at s = 1 is x0 = z - v."""
    x_s, v = at_least_fp32(x_s), at_least_fp32(v)
    return x_s - _sigma(sigma, x_s) * v


def velocity_from_eps(x_s: Tensor, eps: Tensor, sigma: Tensor | float) -> Tensor:
    """v = (eps - x_s) / (1 - s) (fp32; undefined at s = 1, where eps = x_s carries no velocity)."""
    x_s, eps = at_least_fp32(x_s), at_least_fp32(eps)
    return (eps - x_s) / (1 - _sigma(sigma, x_s))


@torch.no_grad()
def sample_flow(teacher: Any, prompts: list[str], z: Tensor, steps: int, guidance: float = 1.0) -> Tensor:
    """A flow teacher's (or its active adapter's) x0 latents from noise ``z``: ``steps`` Euler steps of
    its own FlowMatchEulerDiscreteScheduler (sigma 1 -> 0), CFG ``guidance`` on the velocity, as
    StableDiffusion3Pipeline samples; one step is the one-step generator x0 = z - v."""
    from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: PLC0415 -- diffusers models: seconds to import

    from wadi_core.models.teacher import Cond  # noqa: PLC0415 -- teacher imports this module

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(teacher.scheduler.config)
    scheduler.set_timesteps(steps, device=z.device)
    cond = teacher.encode_prompts(list(prompts))
    both = Cond.cat([teacher.null_cond(len(prompts)), cond]) if guidance != 1.0 else cond
    x = at_least_fp32(z)
    for t in scheduler.timesteps:
        x_in = x.to(teacher.dtype)
        if guidance != 1.0:
            v_u, v_c = at_least_fp32(teacher.predict_velocity(torch.cat([x_in, x_in]), t.expand(2 * len(x)), both)).chunk(2)
            v = v_u + guidance * (v_c - v_u)
        else:
            v = at_least_fp32(teacher.predict_velocity(x_in, t.expand(len(x)), cond))
        x = scheduler.step(v, t, x).prev_sample
    return x
