"""Teacher, fake score and student as three roles of ONE frozen denoiser with named adapters."""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal

import torch
from torch import Tensor, nn

from wadi_core.adapters import adapter_modules, adapter_parameters, apply_adapter, set_adapter
from wadi_core.models.flow import flow_from_vp, x0_from_velocity
from wadi_core.models.teacher import Cond, Teacher
from wadi_core.vsd.config import VSDConfig
from wadi_core.vsd.losses import at_least_fp32, cfg_combine, x0_from_eps

__all__ = ["HALF_DTYPES", "OFFICIAL_STUDENT_ALPHABAR", "Role", "WaDiDistiller", "resolve_student_alphabar"]

Role = Literal["teacher", "student", "fake"]
_ADAPTER_OF_ROLE: dict[str, str | None] = {"teacher": None, "student": "student", "fake": "fake"}


OFFICIAL_STUDENT_ALPHABAR = 0.0047  # the official code's one-step ``a``, SD and PixArt alike

#: The frozen base's dtype and the autocast dtype of each ``VSDConfig.mixed_precision``.
HALF_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_student_alphabar(cfg: VSDConfig, alphas_cumprod: Tensor, prediction_type: str) -> float:
    """``cfg.student_alphabar`` as a number: "schedule" is alphabar at ``cfg.student_timestep``;
    "auto" is the official 0.0047 for an eps teacher and the schedule's for a v-prediction or flow one
    (whose merged export can only reproduce the schedule's ``a``; a flow teacher's is 0 at sigma = 1)."""
    choice = cfg.student_alphabar
    if choice == "auto":
        choice = "schedule" if prediction_type in ("v_prediction", "flow") else OFFICIAL_STUDENT_ALPHABAR
    if choice == "schedule":
        return float(alphas_cumprod[cfg.student_timestep])
    return float(choice)


class WaDiDistiller:
    """Adds adapters "student" and "fake" to ``teacher.denoiser``; the bare base is the teacher.

    Only adapter parameters are trainable; the base weights are frozen and shared, so the
    three roles cost one copy of the model (the public WaDi / DMD2 code holds three).
    """

    def __init__(self, teacher: Teacher, cfg: VSDConfig) -> None:
        self.teacher = teacher.freeze()
        self.cfg = cfg
        schedule_a = float(teacher.alphas_cumprod[cfg.student_timestep])
        if (teacher.prediction_type in ("v_prediction", "flow")
                and abs(self.student_alphabar - schedule_a) > 1e-6 * schedule_a):
            # A merged v-prediction (or flow) student outputs v; a diffusers scheduler turns v into x0 with
            # the schedule's alphabar (sigma) only, so any other ``a`` could not be reproduced by the export.
            raise ValueError(f"a {teacher.prediction_type} teacher needs vsd.student_alphabar=schedule or auto "
                             f"(alphabar_{cfg.student_timestep} = {schedule_a:.3g}), got {cfg.student_alphabar}")
        den = teacher.denoiser
        if cfg.mixed_precision != "no":
            # As the official code: the frozen base in half precision, the adapters added after it in
            # fp32 (``default_adapter_dtype``), the forward under autocast (``autocast``).
            den.to(HALF_DTYPES[cfg.mixed_precision])
        teacher.prompt_encoding = cfg.prompt_encoding  # how ``encode_train_prompts`` encodes
        for role, spec in (("student", cfg.student), ("fake", cfg.fake)):
            apply_adapter(den, spec, role, teacher.family)
        set_adapter(den, None)
        self._active: str | None = None
        if cfg.gradient_checkpointing:
            den.enable_gradient_checkpointing()
        self.alphas_cumprod = teacher.alphas_cumprod.to(teacher.device)

    # -- roles ----------------------------------------------------------------------------------
    @property
    def denoiser(self) -> nn.Module:
        return self.teacher.denoiser

    @property
    def device(self) -> torch.device:
        return self.teacher.device

    def parameters(self, role: Literal["student", "fake"]) -> list[nn.Parameter]:
        """Trainable parameters of one role's adapter."""
        return list(adapter_parameters(self.denoiser, role))

    def modules(self, role: Literal["student", "fake"]) -> nn.Module:
        """The role's adapter modules (what a DeepSpeed engine wraps; the base stays outside)."""
        return adapter_modules(self.denoiser, role)

    @contextlib.contextmanager
    def role(self, role: Role) -> Iterator[None]:
        """Make ``role`` the active adapter (None for the teacher) and restore the previous one."""
        previous, wanted = self._active, _ADAPTER_OF_ROLE[role]
        set_adapter(self.denoiser, wanted)
        self._active = wanted
        try:
            yield
        finally:
            set_adapter(self.denoiser, previous)
            self._active = previous

    def autocast(self) -> contextlib.AbstractContextManager:
        """torch.autocast in ``cfg.mixed_precision`` (a no-op for "no")."""
        mp = self.cfg.mixed_precision
        if mp == "no":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=HALF_DTYPES[mp])

    # -- predictions ----------------------------------------------------------------------------
    def abar(self, t: Tensor) -> Tensor:
        return self.alphas_cumprod[t.to(self.alphas_cumprod.device).long()].to(t.device)

    def eps(self, role: Role, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """epsilon prediction of one role, in fp32 (autocast inside when mixed precision is on)."""
        with self.role(role), self.autocast():
            out = self.teacher.predict_eps(x_t.to(self.teacher.dtype), t, cond)
        return at_least_fp32(out)

    def guided_eps(self, role: Role, x_t: Tensor, t: Tensor, cond: Cond, scale: float | Tensor) -> Tensor:
        """CFG prediction e_u + w (e_c - e_u); one batched forward for both halves. ``scale``: one
        number, or one per sample (B,)."""
        if not isinstance(scale, Tensor) and scale == 1.0:
            return self.eps(role, x_t, t, cond)
        null = self.teacher.null_cond(len(cond))
        e = self.eps(role, torch.cat([x_t, x_t]), torch.cat([t, t]), Cond.cat([null, cond]))
        e_uncond, e_cond = e.chunk(2)
        return cfg_combine(e_uncond, e_cond, scale)

    @property
    def student_alphabar(self) -> float:
        """The ``a`` of the one-step generator (0.0047 in the official code, or the schedule's)."""
        return resolve_student_alphabar(self.cfg, self.teacher.alphas_cumprod, self.teacher.prediction_type)

    def generate(self, z: Tensor, cond: Cond) -> Tensor:
        """One-step generator: x0 = (z - sqrt(1 - a) eps_hat) / sqrt(a), eps_hat = student(z, T, c).

        fp32 throughout, whatever the compute dtype: eps_hat is cast before the division by
        sqrt(a) ~ 0.07, which would amplify half-precision rounding 15x.
        """
        t = torch.full((z.shape[0],), self.cfg.student_timestep, device=z.device, dtype=torch.long)
        if self.teacher.prediction_type == "flow":
            return self._generate_flow(z, t, cond)
        eps_hat = self.eps("student", z, t, cond)  # fp32
        a = torch.full((z.shape[0],), self.student_alphabar, device=z.device, dtype=eps_hat.dtype)
        return x0_from_eps(at_least_fp32(z), eps_hat, a)

    def _generate_flow(self, z: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """Flow one-step generator: x0 = x_s - s v_hat at the student's sigma s (1 at t = T-1, where
        x_s = z and x0 = z - v_hat: the VP form divides by sqrt(abar) = 0 there), fp32."""
        sigma = self.teacher.flow_sigmas.to(torch.float32).to(z.device)[t]
        x_s = flow_from_vp(z, sigma)
        with self.role("student"), self.autocast():
            v_hat = self.teacher.predict_velocity(x_s.to(self.teacher.dtype), sigma * self.teacher.num_train_timesteps,
                                                  cond)
        return x0_from_velocity(x_s, at_least_fp32(v_hat), sigma)

    @torch.no_grad()
    def sample(self, prompts: list[str], generator: torch.Generator | None = None,
               z: Tensor | None = None) -> Tensor:
        """Student one-step images in [0, 1], (B, 3, H, W)."""
        if z is None:
            z = torch.randn(len(prompts), *self.teacher.latent_shape, generator=generator,
                            device=generator.device if generator is not None else "cpu")
        z = z.to(self.device)
        x0 = self.generate(z, self.teacher.encode_prompts(prompts))
        return self.teacher.decode(x0)
