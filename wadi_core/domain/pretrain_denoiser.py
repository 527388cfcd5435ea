"""Phase 2 of the teacher pretraining: text encoder + UNet, optionally data-parallel over processes.

With ``workers > 1`` each process (one thread each) takes ``batch / workers`` samples and the
gradients are averaged with one gloo all-reduce per step: on a busy 2-core machine this uses
two cores without the per-op thread barriers that make ``torch.set_num_threads(2)`` slow.
Per-rank RNG states are saved in the checkpoint, so resuming stays exact.
"""

from __future__ import annotations

import dataclasses
import math
import os
import queue
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed
import torch.multiprocessing as mp
import torch.nn.functional as F
from tqdm.auto import tqdm

from wadi_core.domain.checkpoint import load_training_state, save_training_state
from wadi_core.domain.teacher import build_text_encoder, build_unet, build_vae

__all__ = ["DenoiserData", "train_denoiser", "run_denoiser_phase", "warmup_cosine_lr"]


@dataclasses.dataclass
class DenoiserData:
    """Everything the denoiser phase reads: cached latents, caption token ids, schedule weights."""

    lat_mean: torch.Tensor
    lat_std: torch.Tensor
    combo: torch.Tensor
    combo_ids: torch.Tensor
    empty: int
    scaling: float
    snr_weight: torch.Tensor
    alphas_cumprod: torch.Tensor
    vocab_size: int
    bos_id: int
    eos_id: int
    prediction_type: str = "epsilon"   # or "v_prediction", or "flow" (rectified-flow velocity): the UNet's target
    flow_sigmas: torch.Tensor | None = None  # "flow": sigma_t of grid index t (x_s = (1 - s) z0 + s eps)


def warmup_cosine_lr(base: float, step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine from ``base`` down to 0.1 x ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _steps_override(state_dir: str, total: int, dist: Any) -> int:
    """An operator may shorten or extend a running phase by writing a step count to ``<state_dir>.steps``."""
    value = [total]
    path = Path(f"{state_dir}.steps")
    if dist is None or dist.get_rank() == 0:
        try:
            value = [int(path.read_text().strip())] if path.exists() else [total]
        except ValueError:
            value = [total]
    if dist is not None:
        dist.broadcast_object_list(value, src=0)
    if value[0] != total:
        print(f"denoiser phase: total steps {total} -> {value[0]} (from {path})", flush=True)
    return value[0]


def _rank_seed(seed: int, rank: int) -> int:
    return seed + 7919 * rank


def train_denoiser(rank: int, world: int, cfg: Any, data: DenoiserData, state_dir: str, models: dict | None,
                   log: Callable[[dict[str, float], int], None] | None, progress: bool,
                   stop_after_steps: int | None, step_offset: int, init_file: str | None = None) -> bool:
    """Run (or resume) the denoiser phase from the checkpoint in ``state_dir``; True if stopped early."""
    dist = None
    if world > 1:
        dist = torch.distributed
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    if models is None:
        arch = cfg.arch
        models = {"vae": build_vae(arch), "unet": build_unet(arch),
                  "text_encoder": build_text_encoder(arch, data.vocab_size, data.bos_id, data.eos_id)}
    unet, text_encoder = models["unet"], models["text_encoder"]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.denoiser_lr, weight_decay=0.01)
    generators = {f"generator_rank{r}" if r else "generator": torch.Generator().manual_seed(_rank_seed(cfg.seed, r))
                  for r in range(world)}
    meta = load_training_state(state_dir, models, opt, generators)
    if meta["phase"] != "denoiser":
        raise RuntimeError(f"expected a denoiser-phase checkpoint in {state_dir}, found phase {meta['phase']!r}")
    gen = generators[f"generator_rank{rank}" if rank else "generator"]

    started, elapsed0 = time.time(), float(meta.get("elapsed_s", 0.0))
    unet.train()
    text_encoder.train()
    total = cfg.denoiser_steps
    local_batch = cfg.denoiser_batch // world
    steps_this_call = 0
    ema_loss = None
    bar = tqdm(total=total, initial=meta["step"], desc="denoiser", disable=not (progress and rank == 0), mininterval=5)

    def checkpoint() -> bool:
        if dist is not None:
            states = [None] * world
            dist.all_gather_object(states, gen.get_state())
            for r, st in enumerate(states):
                generators[f"generator_rank{r}" if r else "generator"].set_state(st)
        if rank == 0:
            meta["elapsed_s"] = elapsed0 + time.time() - started
            save_training_state(state_dir, models, opt, generators, meta)
        if dist is not None:
            dist.barrier()
        return stop_after_steps is not None and steps_this_call >= stop_after_steps

    def finish(stopped: bool) -> bool:
        if dist is not None:
            dist.destroy_process_group()
        return stopped

    step = meta["step"]
    while step < total:
        for g in opt.param_groups:
            g["lr"] = warmup_cosine_lr(cfg.denoiser_lr, step, total, cfg.warmup_steps)
        idx = torch.randint(len(data.combo), (local_batch,), generator=gen)
        z0 = (data.lat_mean[idx] + data.lat_std[idx] * torch.randn(data.lat_mean[idx].shape, generator=gen)) * data.scaling
        drop = torch.rand(local_batch, generator=gen) < cfg.caption_dropout
        ids = data.combo_ids[torch.where(drop, torch.full_like(idx, data.empty), data.combo[idx])]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, len(data.alphas_cumprod), (local_batch,), generator=gen)
        abar = data.alphas_cumprod[t].view(-1, 1, 1, 1)
        z_t = abar.sqrt() * z0 + (1 - abar).sqrt() * noise  # DDPM forward process q(z_t | z_0)
        cond = text_encoder(ids)[0]
        target = noise if data.prediction_type == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * z0
        timestep = t
        if data.prediction_type == "flow":  # rectified flow: x_s = (1 - s) z0 + s eps, v = eps - z0, at s * T
            sigma = data.flow_sigmas[t].view(-1, 1, 1, 1)
            z_t, target, timestep = (1 - sigma) * z0 + sigma * noise, noise - z0, sigma.view(-1) * len(data.flow_sigmas)
        per_sample = F.mse_loss(unet(z_t, timestep, encoder_hidden_states=cond).sample, target,
                                reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * data.snr_weight[t]).mean()
        opt.zero_grad(set_to_none=False)
        loss.backward()
        if dist is not None:
            # One all-reduce of all gradients (and the loss, for logging) per step.
            flat = torch.cat([p.grad.reshape(-1) for p in params] + [loss.detach().reshape(1)])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for p in params:
                n = p.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p))
                offset += n
            loss_value = float(flat[-1])
        else:
            loss_value = loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.update(1)
        meta["step"] = step + 1
        steps_this_call += 1
        ema_loss = loss_value if ema_loss is None else 0.98 * ema_loss + 0.02 * loss_value
        if step % 20 == 0 and rank == 0:
            bar.set_postfix(loss=f"{ema_loss:.4f}")
            if log is not None:
                log({"denoiser/loss": loss_value, "denoiser/loss_ema": ema_loss,
                     "denoiser/lr": opt.param_groups[0]["lr"]}, step_offset + step)
        if (step + 1) % cfg.checkpoint_every == 0:
            if checkpoint():
                return finish(True)
            total = _steps_override(state_dir, total, dist)
        step += 1
    bar.close()
    meta["phase"] = "done"
    meta["step"] = 0
    checkpoint()
    return finish(False)


def _spawn_entry(rank: int, world: int, cfg: Any, data: DenoiserData, state_dir: str, progress: bool,
                 stop_after_steps: int | None, step_offset: int, init_file: str, log_queue: Any) -> None:
    def log(metrics: dict[str, float], step: int) -> None:
        log_queue.put((metrics, step))

    stopped = train_denoiser(rank, world, cfg, data, state_dir, None, log if rank == 0 else None, progress,
                             stop_after_steps, step_offset, init_file)
    if rank == 0:
        log_queue.put(("stopped", stopped))


def run_denoiser_phase(cfg: Any, data: DenoiserData, state_dir: str | os.PathLike, models: dict,
                       log: Callable[[dict[str, float], int], None], progress: bool,
                       stop_after_steps: int | None, step_offset: int) -> bool:
    """Train in this process (``cfg.denoiser_workers == 1``) or in spawned gloo workers; True if stopped."""
    world = cfg.denoiser_workers
    if world <= 1:
        return train_denoiser(0, 1, cfg, data, str(state_dir), models, log, progress, stop_after_steps, step_offset)

    ctx = mp.get_context("spawn")
    log_queue = ctx.Queue()
    init_file = str(Path(tempfile.gettempdir()) / f"wadi_pg_{uuid.uuid4().hex}")
    procs = mp.start_processes(
        _spawn_entry, args=(world, cfg, data, str(state_dir), progress, stop_after_steps, step_offset,
                            init_file, log_queue),
        nprocs=world, join=False, start_method="spawn")
    stopped = False

    def drain() -> None:
        nonlocal stopped
        while True:
            try:
                item = log_queue.get_nowait()
            except queue.Empty:
                return
            if item[0] == "stopped":
                stopped = bool(item[1])
            else:
                log(*item)

    while not procs.join(timeout=2):
        drain()
    drain()
    # The workers saved the final state; load it into this process's models.
    generators = {"generator": torch.Generator()}
    load_training_state(state_dir, models, None, generators)
    return stopped
