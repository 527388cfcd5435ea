"""Seeded DDIM sampling shared by the downstream tasks: teacher (N steps, CFG) or one-step student,
optionally with ControlNet residuals, plus a wall-clock timer per image.

The student is loaded from its one-step export (a diffusers folder whose scheduler makes the single
DDIM step from t = T-1 return x0 = (z - sqrt(1 - a) eps) / sqrt(a), the generator it was trained as).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from wadi_core.models.teacher import Cond, Teacher, load_teacher, resolve_teacher_dir

__all__ = ["Residuals", "unet_eps", "sampling_scheduler", "seeded_noise", "sample", "load_one_step_student",
           "time_per_image", "image_size"]

#: ControlNet residuals for a batch: (down-block residuals, mid-block residual), or None.
Residuals = Callable[[Tensor, Tensor, Cond], tuple[tuple[Tensor, ...], Tensor]] | None


def unet_eps(model: Teacher, x_t: Tensor, t: Tensor, cond: Cond,
             residuals: tuple[tuple[Tensor, ...], Tensor] | None = None) -> Tensor:
    """epsilon of an SD-family UNet, with ControlNet residuals added when given (v-prediction converted)."""
    if model.family != "sd":
        raise ValueError("ControlNet and the downstream tasks need an SD-family UNet teacher (unet component); "
                         f"got family {model.family!r}")
    if residuals is None:
        return model.predict_eps(x_t, t, cond)
    down, mid = residuals
    t = t.to(x_t.device).reshape(-1).expand(x_t.shape[0]) if t.numel() == 1 else t.to(x_t.device)
    out = model.denoiser(x_t, t, encoder_hidden_states=cond.embeds, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]
    if model.prediction_type == "v_prediction":
        abar = model.alphas_cumprod.to(x_t.device)[t.long()].view(-1, 1, 1, 1)
        out = abar.sqrt() * out.float() + (1 - abar).sqrt() * x_t.float()
    return out


def image_size(model: Teacher) -> int:
    """Side of the model's images in pixels: latent side x the VAE's downsampling (8 for SD, 4 embedded)."""
    return model.latent_shape[1] * 2 ** (len(model.vae.config.block_out_channels) - 1)


def sampling_scheduler(scheduler: Any, steps: int) -> Any:
    """DDIM, trailing spacing, last step returning x0 (``set_alpha_to_one``): for 1 step from a
    WaDi export's scheduler this is exactly the student's generator."""
    from diffusers import DDIMScheduler  # noqa: PLC0415 -- diffusers models: seconds to import

    sched = DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True,
                                      prediction_type="epsilon")
    sched.set_timesteps(steps)
    return sched


def seeded_noise(model: Teacher, n: int, seed: int, offset: int = 0) -> Tensor:
    """Initial latents; image i gets its own generator, so results do not depend on batching."""
    shape = model.latent_shape
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + offset + i))
                        for i in range(n)])


@torch.no_grad()
def sample(model: Teacher, prompts: list[str], noise: Tensor, steps: int, guidance: float = 1.0,
           residuals: Residuals = None, scheduler: Any = None) -> Tensor:
    """Images float [0, 1] (B, 3, H, W). ``residuals(x_t, t, cond)`` supplies ControlNet residuals
    for the (CFG-doubled) batch; ``scheduler`` defaults to the model's own."""
    sched = sampling_scheduler(scheduler or model.scheduler, steps)
    latents = (noise * sched.init_noise_sigma).to(model.device, model.dtype)
    cond = model.encode_prompts(list(prompts))
    use_cfg = guidance != 1.0
    both = Cond.cat([model.null_cond(len(prompts)), cond]) if use_cfg else cond
    for t in sched.timesteps:
        x = torch.cat([latents, latents]) if use_cfg else latents
        tt = t.reshape(1).to(model.device)
        res = residuals(x, tt, both) if residuals is not None else None
        eps = unet_eps(model, x, tt, both, res)
        if use_cfg:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)  # classifier-free guidance
        latents = sched.step(eps, t, latents, eta=0.0).prev_sample
    return model.decode(latents).float().cpu()


def load_one_step_student(uri: str | os.PathLike, device: str = "cpu") -> Teacher:
    """A WaDi one-step export (diffusers folder, ``s3://`` prefix) as a ``Teacher`` whose scheduler is
    the export's one-step scheduler; refuses a folder that is not a one-step export."""
    model = load_teacher(uri, device=device)

    root = Path(resolve_teacher_dir(uri))
    if not (root / "wadi_export.json").exists():
        raise ValueError(f"{uri} has no wadi_export.json: it is not a WaDi one-step export. Distil a student "
                         "first (jobs/distill.py or jobs/distill_local.py; the export is <out>/export) "
                         "or export a checkpoint with jobs/export.py")
    return model


def time_per_image(fn: Callable[[], Tensor], n_images: int, repeats: int = 2) -> float:
    """Best-of-``repeats`` wall seconds per image of ``fn`` (one warm-up call first)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best / n_images
