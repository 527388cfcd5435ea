"""Pretraining of the embedded teacher: VAE first, then text encoder + UNet jointly.

Pure PyTorch + diffusers; ``jobs/pretrain_teacher.py`` adds argparse and MLflow. Resumable: a
training-state directory (safetensors weights + optimizer, step, RNG; see ``checkpoint``) is
written every ``checkpoint_every`` steps and at each phase end; rerunning resumes from it.
The training renders and their latents are recomputed deterministically from the seed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from wadi_core.domain.attributes import caption
from wadi_core.domain.checkpoint import load_training_state, save_training_state
from wadi_core.domain.data import RenderSet, make_render_set, to_tensor
from wadi_core.domain.pretrain_denoiser import DenoiserData, run_denoiser_phase, warmup_cosine_lr
from wadi_core.domain.teacher import (TeacherArch, assemble_pipeline, build_scheduler, build_text_encoder,
                                      build_training_scheduler, build_unet, build_vae)
from wadi_core.domain.tokenizer import build_tokenizer
from wadi_core.storage import load_component_weights

__all__ = ["PretrainConfig", "pretrain_teacher", "GRID_PROMPTS"]

LogFn = Callable[[dict[str, float], int], None]

GRID_PROMPTS: tuple[str, ...] = (
    "a large red circle on the left", "a small blue square on the right", "a large yellow triangle at the top",
    "a small green circle at the bottom", "a large purple square at the bottom", "a small white triangle on the left",
    "a large blue triangle on the right", "a small yellow square at the top",
)


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Hyper-parameters of the teacher pretraining (the defaults train the shipped teacher: 19.8 min on 2 idle CPU cores)."""

    seed: int = 0                     # seed of the renders, the initial weights, the noise and the batch draws
    num_images: int = 40_000          # training renders (image, silhouette, caption), shared by both phases
    vae_steps: int = 400              # phase 1 steps: the whole VAE
    vae_decoder_steps: int = 150      # phase 1b steps: the decoder alone (encoder frozen, lr 0.3 x vae_lr)
    vae_batch: int = 32               # renders per VAE step
    vae_lr: float = 1e-3              # peak AdamW learning rate of the VAE (warm-up, then cosine to 0.1x)
    vae_kl_weight: float = 1e-6       # weight of the VAE's KL term (per image) beside the reconstruction MSE
    vae_foreground_weight: float = 10.0  # extra MSE weight of object pixels (pixel weight 1 + this x silhouette)
    denoiser_steps: int = 2400        # phase 2 steps: text encoder + UNet jointly
    denoiser_batch: int = 128         # latents per denoiser step (the global batch, split over denoiser_workers)
    denoiser_lr: float = 1e-3         # peak AdamW learning rate of UNet + text encoder (weight decay 0.01)
    caption_dropout: float = 0.1      # empty caption for this fraction of each denoiser batch (for CFG)
    min_snr_gamma: float = 5.0        # Min-SNR-gamma weighting of the denoiser loss (<= 0 or flow: uniform)
    warmup_steps: int = 100           # linear lr warm-up steps of phase 2 (the VAE phases: half as many)
    checkpoint_every: int = 100       # steps between training-state saves (also saved at each phase end)
    num_threads: int = 2              # torch threads of this process (denoiser workers > 1: one thread each)
    denoiser_workers: int = 2         # data-parallel processes of phase 2 (gloo all-reduce; 1: this process)
    # the UNet's target: "epsilon" (SD 1.5), "v_prediction" (SD 2.1) or "flow" (rectified-flow velocity, SD3's
    # parametrisation; saved with a FlowMatchEulerDiscreteScheduler of shift ``flow_shift``)
    prediction_type: str = "epsilon"
    flow_shift: float = 1.0           # sigma shift of the flow scheduler (prediction_type "flow"; 1: none)
    init_from: str = ""               # a teacher pipeline folder: skip the VAE phases, fine-tune its denoiser
    arch: TeacherArch = TeacherArch()

    def __post_init__(self) -> None:
        if self.prediction_type not in ("epsilon", "v_prediction", "flow"):
            raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'flow', got {self.prediction_type!r}")


def _vae_loss(vae, x: torch.Tensor, mask: torch.Tensor, cfg: PretrainConfig, decoder_only: bool) -> tuple[torch.Tensor, dict]:
    # Foreground-weighted MSE: the object covers ~5-20 % of the pixels, and its colour is what
    # the captions fix, so plain MSE would spend the capacity on the background.
    if decoder_only:
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        kl = torch.zeros(())
    else:
        post = vae.encode(x).latent_dist
        z = post.sample()
        kl = post.kl().mean() / x[0].numel()
    rec = vae.decode(z).sample
    w = 1.0 + cfg.vae_foreground_weight * mask[:, None]
    mse = ((rec - x) ** 2 * w).sum() / (w.sum() * 3)
    fg = ((rec - x) ** 2 * mask[:, None]).sum() / (mask.sum() * 3 + 1e-6)
    loss = mse + cfg.vae_kl_weight * kl * x[0].numel()
    return loss, {"vae/loss": loss.item(), "vae/mse": F.mse_loss(rec, x).item(), "vae/fg_mse": fg.item()}


@torch.no_grad()
def _load_pipeline_weights(folder: str, models: dict) -> float:
    """Copy a saved teacher pipeline's VAE, text encoder and UNet weights into ``models``; its latent scaling."""
    configs = {}
    for name, model in models.items():
        state, configs[name] = load_component_weights(folder, name)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"{folder}/{name} does not fit this run's architecture (cfg.arch): pass the arch it "
                             f"was trained with. {str(err).splitlines()[0]}") from err
    return float(configs["vae"]["scaling_factor"])


def _encode_latents(vae, data: RenderSet, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training image (deterministic)."""
    means, stds = [], []
    for i in range(0, len(data.images), batch):
        post = vae.encode(to_tensor(data.images[i:i + batch])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def pretrain_teacher(
    cfg: PretrainConfig,
    out_dir: str | os.PathLike,
    state_dir: str | os.PathLike,
    log: LogFn | None = None,
    progress: bool = True,
    stop_after_steps: int | None = None,
) -> dict[str, float]:
    """Train (or resume) and ``save_pretrained`` the teacher pipeline into ``out_dir``; returns a summary.

    ``stop_after_steps`` stops (as if killed) at the first checkpoint after that many steps of
    this call, without exporting; the summary then has ``stopped: 1.0``. Used to test resuming.
    """
    log = log or (lambda metrics, step: None)
    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    started = time.time()
    arch = cfg.arch
    tok_dir = Path(tempfile.mkdtemp(prefix="wadi_tok_"))
    tokenizer = build_tokenizer(tok_dir, model_max_length=arch.max_tokens)
    vae = build_vae(arch)
    text_encoder = build_text_encoder(arch, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    unet = build_unet(arch)
    generator = torch.Generator().manual_seed(cfg.seed)
    models = {"vae": vae, "text_encoder": text_encoder, "unet": unet}
    arch_record = json.loads(json.dumps(dataclasses.asdict(arch)))  # tuples -> lists, as stored
    meta = {"phase": "vae", "step": 0, "scaling_factor": None, "elapsed_s": 0.0, "arch": arch_record}
    state_dir = Path(state_dir)
    resumed = (state_dir / "state.json").exists()
    phase_opt = None

    def make_opt(phase: str) -> torch.optim.Optimizer:
        if phase == "vae":
            return torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        if phase == "vae_decoder":
            params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
            return torch.optim.AdamW(params, lr=cfg.vae_lr * 0.3, weight_decay=0.0)
        return torch.optim.AdamW(list(unet.parameters()) + list(text_encoder.parameters()),
                                 lr=cfg.denoiser_lr, weight_decay=0.01)

    if resumed:
        saved = json.loads((state_dir / "state.json").read_text())["meta"]
        if saved.get("arch", arch_record) != arch_record:
            raise ValueError(
                f"{state_dir} holds the state of a teacher with another architecture "
                f"({saved['arch']}; this run asks for {arch_record}): pass a new --state-dir, "
                f"or delete that folder to start from scratch")
        phase_opt = make_opt(saved["phase"]) if saved["phase"] != "done" else None
        meta = load_training_state(state_dir, models, phase_opt, generator)
        meta.setdefault("arch", arch_record)
        print(f"resumed from {state_dir}: phase {meta['phase']}, step {meta['step']}")
    elif cfg.init_from:
        meta["phase"], meta["scaling_factor"] = "denoiser", _load_pipeline_weights(cfg.init_from, models)
        print(f"fine-tuning the denoiser of {cfg.init_from} ({cfg.prediction_type}); VAE phases skipped")
    elapsed0 = meta.get("elapsed_s", 0.0)

    steps_this_call = 0

    def checkpoint() -> bool:
        """Save the training state; True if this call should stop here (``stop_after_steps``)."""
        meta["elapsed_s"] = elapsed0 + time.time() - started
        save_training_state(state_dir, models, phase_opt, generator, meta)
        return stop_after_steps is not None and steps_this_call >= stop_after_steps

    stopped = {"stopped": 1.0}

    data = make_render_set(cfg.num_images, cfg.seed, "train", arch.image_size, progress=progress)
    masks = torch.from_numpy(data.masks.astype(np.float32))

    # Phase 1 (and 1b, decoder only): the autoencoder.
    for phase, total in (("vae", cfg.vae_steps), ("vae_decoder", cfg.vae_decoder_steps)):
        if meta["phase"] != phase:
            continue
        opt = phase_opt if phase_opt is not None else make_opt(phase)
        phase_opt = opt
        base_lr = cfg.vae_lr if phase == "vae" else cfg.vae_lr * 0.3
        vae.train()
        bar = tqdm(range(meta["step"], total), desc=phase, disable=not progress, mininterval=5)
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = warmup_cosine_lr(base_lr, step, total, cfg.warmup_steps // 2)
            idx = torch.randint(len(data.images), (cfg.vae_batch,), generator=generator)
            x = to_tensor(data.images[idx.numpy()])
            loss, metrics = _vae_loss(vae, x, masks[idx], cfg, decoder_only=phase == "vae_decoder")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            meta["step"] = step + 1
            steps_this_call += 1
            if step % 20 == 0:
                bar.set_postfix(loss=f"{metrics['vae/loss']:.4f}")
                log(metrics, step if phase == "vae" else cfg.vae_steps + step)
            if (step + 1) % cfg.checkpoint_every == 0 and checkpoint():
                return stopped
        meta["phase"] = "vae_decoder" if phase == "vae" else "denoiser"
        meta["step"] = 0
        phase_opt = None
        if checkpoint():
            return stopped

    # Scale latents to unit variance, as SD's 0.18215 does for its VAE.
    vae.eval().requires_grad_(False)
    lat_mean, lat_std = _encode_latents(vae, data)
    if meta["scaling_factor"] is None:
        g = torch.Generator().manual_seed(cfg.seed + 1)
        z = lat_mean + lat_std * torch.randn(lat_mean.shape, generator=g)
        meta["scaling_factor"] = float(1.0 / z.std())
    scaling = meta["scaling_factor"]
    vae.register_to_config(scaling_factor=scaling)

    # Phase 2: text encoder + UNet jointly, eps or v prediction, 10 % caption dropout (for CFG).
    combo_ids = tokenizer([caption(a) for a in data.combos] + [""], padding="max_length",
                          max_length=arch.max_tokens, truncation=True, return_tensors="pt").input_ids
    empty = len(data.combos)
    combo = torch.from_numpy(data.combo.astype(np.int64))
    noise_sched = build_training_scheduler()
    # Min-SNR-gamma weighting (Hang et al. 2023): min(SNR, gamma) / SNR for eps-prediction,
    # min(SNR, gamma) / (SNR + 1) for v-prediction; it stops the many easy low-noise steps from
    # dominating and converges several times faster.
    snr = noise_sched.alphas_cumprod / (1 - noise_sched.alphas_cumprod)
    denom = snr if cfg.prediction_type == "epsilon" else snr + 1
    snr_weight = (snr.clamp(max=cfg.min_snr_gamma) / denom) if cfg.min_snr_gamma > 0 else torch.ones_like(snr)
    flow_sigmas = None
    if cfg.prediction_type == "flow":  # plain velocity MSE on the scheduler's grid (rectified flow, SD3)
        from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: PLC0415 -- diffusers models: seconds to import

        # the scheduler's own training grid, ascending: index t is sigma = shift u / (1 + (shift - 1) u), u = (t+1)/T
        flow_sigmas = FlowMatchEulerDiscreteScheduler(num_train_timesteps=len(snr), shift=cfg.flow_shift).sigmas.flip(0)
        snr_weight = torch.ones_like(snr)
    if meta["phase"] == "denoiser":
        data2 = DenoiserData(lat_mean, lat_std, combo, combo_ids, empty, scaling, snr_weight,
                             noise_sched.alphas_cumprod.clone(), len(tokenizer), tokenizer.bos_token_id,
                             tokenizer.eos_token_id, cfg.prediction_type, flow_sigmas)
        if meta["step"] == 0:  # phase start: save it with the scaling factor (no optimizer yet)
            meta["elapsed_s"] = elapsed0 + time.time() - started
            save_training_state(state_dir, models, None, generator, meta)
        if run_denoiser_phase(cfg, data2, state_dir, models, log, progress,
                              None if stop_after_steps is None else max(1, stop_after_steps - steps_this_call),
                              cfg.vae_steps + cfg.vae_decoder_steps):
            return stopped
        meta = load_training_state(state_dir, models, None, generator)

    unet.eval()
    text_encoder.eval()
    if cfg.prediction_type == "flow":
        from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: PLC0415 -- diffusers models: seconds to import

        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=len(snr), shift=cfg.flow_shift)
    else:
        scheduler = build_scheduler(cfg.prediction_type)
    pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    wall = elapsed0 + time.time() - started
    return {"wall_time_s": wall, "scaling_factor": scaling}
