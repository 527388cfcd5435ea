"""ControlNet on a WaDi teacher: build it from the teacher's UNet, one training step, residuals
for sampling, and the silhouette control signal the domain renderer gives exactly.

The ControlNet is trained against the frozen teacher (epsilon loss, as in the ControlNet paper)
and then drives both the teacher (N steps, CFG) and the one-step student: the student is the
teacher's UNet with rotated rows (LoRaD), so the same residuals fit it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from wadi_core import storage
from wadi_core.domain import caption, eval_prompts, parse_caption, render_with_mask
from wadi_core.domain.data import make_render_set
from wadi_core.downstream.sampling import image_size, unet_eps
from wadi_core.downstream.training import encode_renders, snr_weight
from wadi_core.models.teacher import Cond, Teacher

__all__ = ["ControlNetConfig", "build_controlnet", "load_controlnet", "control_tensor", "controlnet_residuals",
           "controlnet_step", "drop_captions", "train_controlnet", "control_eval_set", "domain_control_samples",
           "vae_factor"]


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """ControlNet training on renders of the domain with their silhouettes as control."""

    steps: int = 800                  # ControlNet optimizer steps
    batch_size: int = 32              # renders per step (the global batch when data-parallel)
    lr: float = 1e-3                  # AdamW learning rate of the ControlNet (no weight decay)
    num_images: int = 4000            # distinct renders (silhouette, image, caption) to draw batches from
    caption_dropout: float = 0.1      # empty prompt for this fraction, so CFG works with the control
    min_snr_gamma: float = 5.0        # the teacher's own pretraining weighting
    conditioning_channels: int = 1    # silhouette: one channel
    embedding_channels: tuple[int, ...] = (16, 32, 64)  # control encoder; len - 1 stride-2 convs
    grad_clip: float = 1.0            # max global gradient norm of the ControlNet per step
    one_step_fraction: float = 0.25   # share of each batch at t = T-1, scored as a one-step student's x0
    one_step_weight: float = 0.5      # 0: plain ControlNet training (eps loss only)
    seed: int = 0                     # seed of the initial ControlNet, the renders and the batch draws
    max_minutes: float = 0.0          # > 0: stop training after this long

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.num_images < 1:
            raise ValueError(f"need steps >= 0, batch_size >= 1, num_images >= 1; got {self.steps}, "
                             f"{self.batch_size}, {self.num_images}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")


def vae_factor(model: Teacher) -> int:
    """Image pixels per latent pixel (8 for SD, 4 for the embedded teacher)."""
    return 2 ** (len(model.vae.config.block_out_channels) - 1)


def build_controlnet(model: Teacher, cfg: ControlNetConfig = ControlNetConfig()) -> Any:
    """A diffusers ``ControlNetModel`` initialised from the teacher's UNet (zero convs at zero)."""
    from diffusers import ControlNetModel  # noqa: PLC0415 -- diffusers models: seconds to import

    downs = len(cfg.embedding_channels) - 1
    if 2 ** downs != vae_factor(model):
        raise ValueError(f"the control encoder must downsample images {vae_factor(model)}x to the latent size, "
                         f"so embedding_channels needs {int(math.log2(vae_factor(model))) + 1} entries; got "
                         f"{cfg.embedding_channels}")
    if model.family != "sd":
        raise ValueError("ControlNet needs an SD-family UNet teacher")
    return ControlNetModel.from_unet(model.denoiser, conditioning_embedding_out_channels=cfg.embedding_channels,
                                     conditioning_channels=cfg.conditioning_channels).to(model.device)


def load_controlnet(uri: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    """A saved ``ControlNetModel`` (diffusers folder with config.json + safetensors): a local path or an
    ``s3://`` prefix, e.g. an SD 1.5 ControlNet you converted to diffusers format. Never the hub."""
    from diffusers import ControlNetModel  # noqa: PLC0415 -- diffusers models: seconds to import

    root = storage.materialize(uri) if storage.is_remote(uri) else Path(uri).expanduser()
    if not (Path(root) / "config.json").exists():
        raise FileNotFoundError(f"{uri}: no config.json, so not a diffusers ControlNetModel folder (save one with "
                                "ControlNetModel.save_pretrained, or convert an SD ControlNet .safetensors with "
                                "diffusers' convert_original_controlnet_to_diffusers script)")
    if not any(Path(root).glob("*.safetensors")):
        raise FileNotFoundError(f"{uri}: no .safetensors weights; pickled .bin weights are not loaded")
    return ControlNetModel.from_pretrained(str(root), use_safetensors=True).to(device).eval().requires_grad_(False)


def control_tensor(masks: np.ndarray | Tensor, controlnet: Any, model: Teacher) -> Tensor:
    """Silhouettes (B, H, W) in [0, 1] -> the ControlNet's conditioning image: its channel count,
    the teacher's image size (latent size x VAE factor)."""
    x = torch.as_tensor(np.asarray(masks, np.float32) if not isinstance(masks, Tensor) else masks).float()[:, None]
    size = image_size(model)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    channels = int(controlnet.config.conditioning_channels)
    return x.expand(-1, channels, -1, -1).to(model.device, model.dtype)


def controlnet_residuals(controlnet: Any, control: Tensor, scale: float = 1.0) -> Callable:
    """``residuals(x_t, t, cond)`` for ``sampling.sample``: the control is repeated to match a
    CFG-doubled batch (the unconditional half is controlled too, as diffusers' pipeline does)."""
    def residuals(x_t: Tensor, t: Tensor, cond: Cond) -> tuple[tuple[Tensor, ...], Tensor]:
        c = control.repeat(x_t.shape[0] // control.shape[0], 1, 1, 1)
        tt = t.reshape(-1).expand(x_t.shape[0]) if t.numel() == 1 else t
        down, mid = controlnet(x_t, tt, encoder_hidden_states=cond.embeds, controlnet_cond=c,
                               conditioning_scale=scale, return_dict=False)
        return tuple(down), mid

    return residuals


def controlnet_step(model: Teacher, controlnet: Any, optimizer: torch.optim.Optimizer, latents: Tensor,
                    control: Tensor, cond: Cond, weights: Tensor, generator: torch.Generator,
                    grad_clip: float = 1.0, one_step_fraction: float = 0.0,
                    one_step_weight: float = 0.0) -> dict[str, float]:
    """One ControlNet update on a batch of clean latents, their control images and text conditioning.

    The teacher UNet is frozen; gradients reach the ControlNet through the residuals it adds.
    A ``one_step_fraction`` of the batch is noised to t = T-1 and scored in x0 space,
    x0 = (x_T - sqrt(1 - a) eps) / sqrt(a), with ``one_step_weight``: that is the prediction a
    one-step student makes, where an error in eps is amplified sqrt((1 - a) / a) ~ 15x, so
    residuals that are harmless for a 25-step sampler would shift the student's colours. The
    rest of the batch has the teacher's uniform-t, Min-SNR epsilon loss. This is the whole
    per-worker step: a data-parallel trainer wraps ``controlnet`` (DDP/DeepSpeed) and calls it unchanged.
    """
    b = latents.shape[0]
    last = model.num_train_timesteps - 1
    k = int(round(b * one_step_fraction)) if one_step_weight > 0 else 0
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    t = torch.randint(0, model.num_train_timesteps, (b,), generator=generator)
    t[:k] = last
    t = t.to(latents.device)
    abar = model.alphas_cumprod.to(latents.device)[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    down, mid = controlnet(x_t, t, encoder_hidden_states=cond.embeds, controlnet_cond=control, return_dict=False)
    eps = unet_eps(model, x_t, t, cond, (tuple(down), mid)).float()
    # Min-SNR weighted epsilon loss, the weighting the embedded teacher was trained with.
    per_sample = ((eps[k:] - noise[k:].float()) ** 2).mean(dim=(1, 2, 3))
    loss_eps = (per_sample * weights.to(latents.device)[t[k:]]).mean() if k < b else torch.zeros(())
    loss = loss_eps
    loss_x0 = torch.zeros(())
    if k:
        a = abar[:k].float()
        x0 = (x_t[:k].float() - (1 - a).sqrt() * eps[:k]) / a.sqrt()
        loss_x0 = ((x0 - latents[:k].float()) ** 2).mean()
        loss = loss_eps * (b - k) / b + one_step_weight * loss_x0 * k / b
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(controlnet.parameters(), grad_clip)
    optimizer.step()
    return {"loss": loss.item(), "loss_eps": loss_eps.item(), "loss_x0": loss_x0.item(), "grad_norm": grad_norm.item()}


def drop_captions(embeds: Tensor, null: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """Each prompt's embedding replaced by the empty prompt's ``null`` with probability ``p`` (so
    classifier-free guidance works with the control)."""
    drop = torch.rand(embeds.shape[0], generator=generator) < p
    return torch.where(drop.view(-1, 1, 1).to(embeds.device), null.expand_as(embeds), embeds)


def train_controlnet(model: Teacher, cfg: ControlNetConfig, controlnet: Any | None = None,
                     log: Callable[[dict[str, float], int], None] | None = None,
                     progress: bool = True) -> tuple[Any, dict[str, float]]:
    """Train a ControlNet on ``cfg.num_images`` domain renders (silhouette control); returns it and a summary."""
    torch.manual_seed(cfg.seed)
    data = make_render_set(cfg.num_images, cfg.seed + 101, "train", size=image_size(model))
    latents = encode_renders(model, data.images)
    combo_cond = model.encode_prompts([caption(a) for a in data.combos])  # frozen text encoder: once
    null = model.null_cond(1).embeds
    controlnet = controlnet if controlnet is not None else build_controlnet(model, cfg)
    controlnet.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=cfg.lr, weight_decay=0.0)
    weights = snr_weight(model, cfg.min_snr_gamma)
    gen = torch.Generator().manual_seed(cfg.seed)
    combo = torch.from_numpy(data.combo.astype(np.int64))
    masks = torch.from_numpy(data.masks.astype(np.float32))
    started, metrics, done = time.time(), {"loss": float("nan")}, 0
    bar = tqdm(range(cfg.steps), desc="controlnet", disable=not progress, mininterval=5)
    ema_loss = None
    for step in bar:
        if cfg.max_minutes and time.time() - started > 60 * cfg.max_minutes:
            break
        idx = torch.randint(len(latents), (cfg.batch_size,), generator=gen)
        embeds = drop_captions(combo_cond.embeds[combo[idx]], null, cfg.caption_dropout, gen)
        control = control_tensor(masks[idx], controlnet, model)
        metrics = controlnet_step(model, controlnet, optimizer, latents[idx], control, Cond(embeds), weights, gen,
                                  cfg.grad_clip, cfg.one_step_fraction, cfg.one_step_weight)
        done += 1
        ema_loss = metrics["loss"] if ema_loss is None else 0.98 * ema_loss + 0.02 * metrics["loss"]
        if step % 25 == 0:
            bar.set_postfix(loss=f"{ema_loss:.4f}")
            if log:
                log({f"controlnet/{k}": v for k, v in metrics.items()}, step)
    controlnet.eval().requires_grad_(False)
    return controlnet, {"train_steps": float(done), "train_seconds": time.time() - started,
                        "final_loss_ema": float(ema_loss if ema_loss is not None else float("nan"))}


def control_eval_set(n: int, seed: int = 1, split: str = "train", size: int = 32) -> tuple[list[str], np.ndarray]:
    """``n`` evaluation captions and, for each, an exact silhouette (float coverage (n, H, W)) of a
    fresh render of that caption: what the generated object should cover."""
    prompts = eval_prompts(n, seed=seed, split=split)
    masks = np.stack([render_with_mask(parse_caption(p), seed * 7919 + i, size)[1] for i, p in enumerate(prompts)])
    return prompts, masks


def domain_control_samples(n: int, seed: int, size: int = 32):
    """``(key, image uint8 (H, W, 3), silhouette uint8 (H, W), caption)`` for ``n`` domain renders: the
    rows of an image lake (``pipelines.data.control_lake.write_control_shards``) for Ray Train, the same
    renders ``train_controlnet`` draws its batches from for a given ``seed``."""
    data = make_render_set(n, seed + 101, "train", size=size)
    for i in range(n):
        mask = np.clip(np.rint(data.masks[i] * 255), 0, 255).astype(np.uint8)
        yield f"{seed:04d}_{i:07d}", data.images[i], mask, caption(data.combos[data.combo[i]])
