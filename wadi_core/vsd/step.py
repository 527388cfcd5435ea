"""One VSD (or DMD2) iteration: a generator update, then fake-score update(s)."""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from wadi_core.models.teacher import Cond
from wadi_core.vsd.distiller import WaDiDistiller
from wadi_core.vsd.draws import Draws, GeneratorDraws
from wadi_core.vsd.losses import (add_noise, at_least_fp32, dmd2_gradient, fake_score_loss, generator_loss,
                                  guidance_in_interval, vsd_gradient)
from wadi_core.vsd.optim import make_optimizer

__all__ = ["Updater", "StepResult", "TorchUpdater", "vsd_step", "make_updaters", "NonFiniteGuard", "NonFiniteTraining"]


class StepResult(NamedTuple):
    """What an :class:`Updater` step did."""

    grad_norm: float  # pre-clip global gradient norm (nan / inf when that is why the step was skipped)
    stepped: bool  # False: the loss or a gradient was not finite on some rank, so no rank stepped


@runtime_checkable
class Updater(Protocol):
    """Owns backward + clip + optimizer step for one role (plain PyTorch here, DeepSpeed in pipelines/).

    A step whose loss or gradient norm is not finite (on any rank, for a distributed updater) is
    skipped everywhere: the gradients are dropped and the weights and optimizer state stay as they
    were. One bad batch must not turn an adapter into NaNs for the rest of the run.
    """

    def backward(self, loss: Tensor) -> None: ...

    def step(self) -> StepResult:
        """Check loss and grad norm, then clip + step the optimizer (or skip); zero the grads."""
        ...


def _total_norm(grads: list[Tensor]) -> Tensor:
    """L2 norm over all gradients (at least fp32 accumulation; nan / inf if any element is)."""
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(at_least_fp32(g)) for g in grads]))


class TorchUpdater:
    """AdamW on a parameter list with grad-norm clipping, a non-finite check (and a GradScaler for fp16)."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, clip: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), fp16_scaler: bool = False,
                 optimizer: str = "adamw") -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("TorchUpdater got no trainable parameters: was the adapter added?")
        self.optimizer = make_optimizer(self.params, optimizer, lr, betas, weight_decay)
        self.clip = clip
        device = self.params[0].device.type
        self.scaler = torch.amp.GradScaler(device) if fp16_scaler else None
        self._loss_finite = torch.ones((), dtype=torch.bool)

    def backward(self, loss: Tensor) -> None:
        self._loss_finite = torch.isfinite(loss.detach()).all()
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> StepResult:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = _total_norm(grads).to(self._loss_finite.device)
        # fp16: an overflowing gradient is the GradScaler's business (it skips and lowers the scale).
        ok = bool(self._loss_finite & (torch.isfinite(norm) | (self.scaler is not None)))
        if ok:
            clip_coef = torch.clamp(self.clip / (norm + 1e-6), max=1.0)  # as clip_grad_norm_
            for g in grads:
                g.mul_(clip_coef.to(g.device))
            if self.scaler:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        if self.scaler:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(float(norm), ok)

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"optimizer": self.optimizer.state_dict()}
        if self.scaler:
            out["scaler"] = self.scaler.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def vsd_step(distiller: WaDiDistiller, cond: Cond, student_updater: Updater, fake_updater: Updater,
             draws: torch.Generator | Draws) -> dict[str, float]:
    """One generator update and ``cfg.fake_steps_per_gen`` fake-score updates (WaDi, arXiv 2603.08258:
    VSD with a LoRaD student and a LoRaD fake score on one frozen base).

    ``draws``: where the noise, timesteps and null-prompt coins come from (``wadi_core.vsd.draws``): a
    generator (every draw from it in call order), or ``KeyedDraws`` (per sample, keyed by its global
    index: the same draws at any world size)."""
    rng = GeneratorDraws(draws) if isinstance(draws, torch.Generator) else draws
    cfg, dev, n = distiller.cfg, distiller.device, len(cond)
    shape = (n, *distiller.teacher.latent_shape)
    null = distiller.teacher.null_cond(n)
    w_real, w_fake = cfg.effective_guidance

    # Generator. x0 keeps the graph to the student adapter (the base is frozen, fake inactive).
    x0 = distiller.generate(rng.normal(shape, dev), cond)
    # Diffuse the sample to a random t away from both ends, where the scores are informative.
    t = rng.integers(cfg.t_min, cfg.t_max + 1, n, dev)
    abar_t = distiller.abar(t)
    x_t = add_noise(x0.detach(), rng.normal(shape, dev), abar_t)
    w_real, w_fake = (guidance_in_interval(w, t, cfg.guidance_t_max) for w in (w_real, w_fake))
    # Teacher and fake are constants here: no_grad also keeps a DeepSpeed fake engine out of
    # the generator's graph (an engine's hooks would otherwise fire inside it).
    with torch.no_grad():
        e_real = distiller.guided_eps("teacher", x_t, t, cond, w_real)
        e_fake = distiller.guided_eps("fake", x_t, t, cond, w_fake)
    if cfg.loss == "vsd":  # sigma_t^2 (e_real - e_fake): the KL gradient at x0 up to a constant
        g = vsd_gradient(e_real, e_fake, abar_t)
    else:  # DMD2: same direction, normalised per sample by the real score's x0 error
        g = dmd2_gradient(x0.detach(), x_t, e_real, e_fake, abar_t)
    # Stop-grad target so that dL/dx0 = g / numel: the loss value itself is meaningless.
    loss_g = generator_loss(x0, g)
    # Checkpointed blocks recompute their forward during backward: the student must be active.
    with distiller.role("student"):
        student_updater.backward(loss_g)
    student_step = student_updater.step()  # skipped on every rank if the loss or a gradient is not finite

    # Fake score: plain denoising on the student's current samples, so it tracks their
    # distribution; alphabar weighting and a 10 % null prompt (for its CFG) as in WaDi.
    losses_f, steps_f = [], []
    for k in range(cfg.fake_steps_per_gen):
        if k == 0:
            x0_f = x0.detach()
        else:  # TTUR: extra fake updates on fresh samples of the (just updated) student
            with torch.no_grad():
                x0_f = distiller.generate(rng.normal(shape, dev), cond)
        t_f = rng.integers(0, distiller.teacher.num_train_timesteps, n, dev)
        abar_f = distiller.abar(t_f)
        eps_f = rng.normal(shape, dev)
        drop = rng.uniform(n, dev) < cfg.null_prob
        with distiller.role("fake"):
            e_pred = distiller.eps("fake", add_noise(x0_f, eps_f, abar_f), t_f, cond.where(drop, null))
            loss_f = fake_score_loss(e_pred, eps_f, abar_f)
            fake_updater.backward(loss_f)
        steps_f.append(fake_updater.step())
        losses_f.append(float(loss_f.detach()))

    return {
        "loss_gen": float(loss_g.detach()),
        "loss_fake": sum(losses_f) / len(losses_f),
        "grad_norm_student": student_step.grad_norm,
        "grad_norm_fake": sum(s.grad_norm for s in steps_f) / len(steps_f),
        # 1.0: some update of this step was skipped for a non-finite loss / gradient (Updater.step)
        "skipped_nonfinite": float(not (student_step.stepped and all(s.stepped for s in steps_f))),
        "g_abs_mean": float(g.abs().mean()),
        "g_abs_max": float(g.abs().max()),
        "score_gap": float((e_real - e_fake).abs().mean()),
        "x0_std": float(x0.detach().std()),
    }


class NonFiniteTraining(RuntimeError):
    """Too many VSD steps in a row had a non-finite loss or gradient."""


class NonFiniteGuard:
    """Counts VSD steps whose update was skipped for a non-finite loss / gradient
    (``vsd_step``'s ``skipped_nonfinite``); ``limit`` of them in a row stop the run (0: never)."""

    def __init__(self, limit: int, total: int = 0) -> None:
        self.limit, self.total, self.in_a_row = limit, total, 0

    def update(self, metrics: Mapping[str, float], step: int) -> None:
        if not metrics.get("skipped_nonfinite"):
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        warnings.warn(f"VSD step {step}: a loss or gradient was not finite, the update was skipped "
                      f"({self.in_a_row} in a row, {self.total} in this run)")
        if self.limit and self.in_a_row >= self.limit:
            raise NonFiniteTraining(
                f"{self.in_a_row} VSD steps in a row (up to step {step}) had a non-finite loss or gradient and "
                "were skipped: training diverged or the prompts / teacher produce NaNs. Lower the learning "
                "rates (vsd.gen_lr, vsd.fake_lr) or the CFG scales, try vsd.mixed_precision=no, check the "
                "prompts; the last checkpoint holds finite adapters to resume from. The limit is "
                "max_nonfinite_in_a_row (0 never stops).")


def make_updaters(distiller: WaDiDistiller) -> dict[str, TorchUpdater]:
    """AdamW updaters (``cfg.optimizer``) for "student" (gen_lr) and "fake" (fake_lr) as in the paper."""
    cfg = distiller.cfg
    fp16 = cfg.mixed_precision == "fp16"
    return {
        "student": TorchUpdater(distiller.parameters("student"), cfg.gen_lr, cfg.grad_clip, cfg.weight_decay,
                                cfg.adam_betas, fp16_scaler=fp16, optimizer=cfg.optimizer),
        "fake": TorchUpdater(distiller.parameters("fake"), cfg.fake_lr, cfg.grad_clip, cfg.weight_decay,
                             cfg.adam_betas, fp16_scaler=fp16, optimizer=cfg.optimizer),
    }
