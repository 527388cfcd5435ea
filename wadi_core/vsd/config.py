"""Typed configuration of the VSD / DMD2 distillation step (WaDi, arXiv 2603.08258; docs/ARCHITECTURE.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from wadi_core.adapters.spec import PRESET_TARGETS, AdapterSpec

__all__ = ["AdapterSpec", "DMD2Config", "VSDConfig", "PRESET_TARGETS"]


@dataclass(frozen=True)
class DMD2Config:
    """DMD2 variant: normalised gradient with real CFG 1.75 and no fake CFG."""

    guidance_real: float = 1.75  # CFG of the teacher in the DMD2 generator loss
    guidance_fake: float = 1.0  # CFG of the fake score in the DMD2 generator loss


@dataclass(frozen=True)
class VSDConfig:
    """Everything the VSD step needs; defaults are the paper's SD1.5 recipe."""

    loss: Literal["vsd", "dmd2"] = "vsd"  # generator loss: vsd (the paper's) or dmd2 (normalised gradient, own guidance)
    guidance_real: float = 1.5        # CFG of the teacher in the generator loss (VSD)
    guidance_fake: float = 1.5        # CFG of the fake score in the generator loss (VSD)
    # real and fake CFG apply to generator-loss timesteps t <= guidance_t_max; above it both use CFG 1
    # (guidance in a limited interval, Kynkaanniemi et al. 2024: high-noise guidance removes layout diversity)
    guidance_t_max: int = 999
    dmd2: DMD2Config = field(default_factory=DMD2Config)
    t_min: int = 20                   # generator-loss timesteps t ~ U{t_min..t_max}
    t_max: int = 980  # largest generator-loss timestep (see t_min)
    student_timestep: int = 999       # the one-step generator evaluates the student here
    # alphabar of the one-step parametrisation x0 = (z - sqrt(1 - a) eps_hat) / sqrt(a): the official
    # code uses 0.0047 for SD and PixArt alike; "schedule" takes the teacher's alphabar at student_timestep;
    # "auto": 0.0047 for an eps teacher, "schedule" for a v-prediction one (the only a its export can reproduce).
    student_alphabar: float | Literal["schedule", "auto"] = "auto"
    null_prob: float = 0.1            # fake-score loss: share of prompts replaced by ""
    fake_steps_per_gen: int = 1       # TTUR: fake-score updates per generator update (DMD2: 10)
    gen_lr: float = 1e-4  # learning rate of the student (generator) adapter
    fake_lr: float = 1e-2  # learning rate of the fake-score adapter
    grad_clip: float = 1.0  # gradient-norm clip of both adapters (> 0; a large value disables it)
    weight_decay: float = 0.0  # AdamW weight decay of both adapters
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas of both adapters
    student: AdapterSpec = field(default_factory=lambda: AdapterSpec("lorad", 256))
    fake: AdapterSpec = field(default_factory=lambda: AdapterSpec("lorad", 32))
    student_ema: float = 0.0          # EMA decay of the student adapter used for samples and export (0: off)
    # "bf16" / "fp16": the frozen base in that dtype and the forward under torch.autocast, the adapters
    # and their optimizer state in fp32 (as the official code: fp16 base, fp32 angles, autocast)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False  # recompute denoiser activations in the backward pass (less memory, slower)
    # "adamw": torch AdamW, fp32 state; "adamw_8bit": bitsandbytes AdamW8bit (the official --use_8bit_adam),
    # 8-bit blockwise state, an optional dependency (pip install bitsandbytes)
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    # CLIP training prompts: "diffusers" encodes them as StableDiffusionPipeline does at inference (no
    # attention mask); "official" as the official training data (mask on), the null prompt without.
    # T5 (PixArt) takes its mask either way.
    prompt_encoding: Literal["diffusers", "official"] = "diffusers"

    def __post_init__(self) -> None:
        if not 0 <= self.t_min <= self.t_max:
            raise ValueError(f"need 0 <= t_min <= t_max, got t_min={self.t_min}, t_max={self.t_max}")
        if self.guidance_t_max < 0:
            raise ValueError(f"guidance_t_max must be >= 0 (guidance for t <= guidance_t_max), got {self.guidance_t_max}")
        if not 0.0 <= self.null_prob <= 1.0:
            raise ValueError(f"null_prob must be in [0, 1], got {self.null_prob}")
        if self.fake_steps_per_gen < 1:
            raise ValueError(f"fake_steps_per_gen must be >= 1, got {self.fake_steps_per_gen}")
        if self.student_alphabar not in ("schedule", "auto") and not 0.0 < float(self.student_alphabar) < 1.0:
            raise ValueError(f"student_alphabar must be in (0, 1), 'schedule' or 'auto', got {self.student_alphabar!r}")
        if not 0.0 <= self.student_ema < 1.0:
            raise ValueError(f"student_ema is an EMA decay in [0, 1) (0: off), got {self.student_ema}")
        if self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 (use a large value to disable), got {self.grad_clip}")
        if self.optimizer not in ("adamw", "adamw_8bit"):
            raise ValueError(f"optimizer must be 'adamw' or 'adamw_8bit', got {self.optimizer!r}")
        if self.prompt_encoding not in ("diffusers", "official"):
            raise ValueError(f"prompt_encoding must be 'diffusers' or 'official', got {self.prompt_encoding!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        for name, lr in (("gen_lr", self.gen_lr), ("fake_lr", self.fake_lr)):
            if not 0.0 < lr < float("inf"):
                raise ValueError(f"{name} must be a positive, finite learning rate, got {lr}")

    @property
    def effective_guidance(self) -> tuple[float, float]:
        """(real, fake) CFG scales used in the generator loss for the selected loss."""
        if self.loss == "dmd2":
            return self.dmd2.guidance_real, self.dmd2.guidance_fake
        return self.guidance_real, self.guidance_fake
