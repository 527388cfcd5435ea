"""Export a distilled student as a merged one-step diffusers pipeline (+ adapter files).

The output directory loads with ``DiffusionPipeline.from_pretrained(out)`` and samples with
``num_inference_steps=1, guidance_scale=1.0``: its scheduler is DDIM with "trailing" spacing
and ``set_alpha_to_one``, so the single step starts at t = T-1 and returns
x0 = (z - sqrt(1 - a) eps) / sqrt(a), the distiller's generator (a flow teacher, SD3: its own
FlowMatchEulerDiscreteScheduler, whose 1 step at sigma = 1 returns x0 = z - v). The student's ``a`` (0.0047 in
the official code) is not the schedule's alphabar_{T-1} in general (PixArt: 4.0e-5), so the
exported schedule's last beta is set to make alphabar_{T-1} = a; every other timestep keeps the
teacher's schedule.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from wadi_core.adapters import (AdapterSpec, adapter_state_dict, apply_adapter, load_adapter_state_dict, merge_adapter,
                                remove_adapters, save_adapter_file, set_adapter)
from wadi_core.config import to_flat_dict
from wadi_core.models.teacher import Teacher
from wadi_core.vsd.config import VSDConfig
from wadi_core.vsd.distiller import resolve_student_alphabar

__all__ = ["export_one_step_pipeline", "one_step_scheduler", "one_step_flow_scheduler", "merged_student_denoiser"]


def one_step_betas(alphas_cumprod: Tensor, alphabar_last: float) -> list[float]:
    """Betas of the schedule ``alphas_cumprod`` with only the last changed so that its
    float32 cumulative product ends exactly at ``alphabar_last`` (as diffusers computes it).

    The last beta may be negative (alpha > 1) when ``alphabar_last`` > alphabar_{T-2}, as for
    PixArt; schedulers only ever use the cumulative product, never that beta alone.
    """
    abar = alphas_cumprod.to(torch.float64)
    betas = torch.cat([1 - abar[:1], 1 - abar[1:] / abar[:-1]]).to(torch.float32)
    prev32 = torch.cumprod(1.0 - betas[:-1], dim=0)[-1]  # the float32 product diffusers will form
    betas[-1] = float(1.0 - alphabar_last / float(prev32))
    return betas.tolist()


def one_step_scheduler(teacher_scheduler: Any, student_alphabar: float | None = None) -> Any:
    """DDIM on the teacher's noise schedule whose 1-step sample starts at t = T-1 and returns
    x0 = (z - sqrt(1 - a) eps) / sqrt(a) with ``a = student_alphabar`` (default: the schedule's)."""
    from diffusers import DDIMScheduler  # noqa: PLC0415 -- diffusers models: seconds to import

    extra: dict[str, Any] = {}
    abar = teacher_scheduler.alphas_cumprod.detach().cpu()
    if student_alphabar is not None and abs(float(abar[-1]) - student_alphabar) > 1e-7 * student_alphabar:
        extra = {"trained_betas": one_step_betas(abar, student_alphabar), "beta_schedule": "linear"}
    return DDIMScheduler.from_config(
        teacher_scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True,
        clip_sample=False, thresholding=False, steps_offset=1, **extra,
    )


def merged_student_denoiser(teacher: Teacher, spec: AdapterSpec, student_state: Mapping[str, Tensor],
                            dtype: torch.dtype | None = None) -> nn.Module:
    """A fresh CPU copy of the base denoiser with the student merged in and no adapter left.

    Built from config and the base weights, so the (shared, frozen) training model is untouched.
    """
    den = teacher.denoiser
    # At least fp32 by default: a base trained in half precision (vsd.mixed_precision) must not make a
    # half-precision denoiser next to the pipeline's fp32 VAE and text encoder.
    dtype = dtype or torch.promote_types(teacher.dtype, torch.float32)
    merged = type(den).from_config(den.config)  # fp32 on CPU
    wanted = merged.state_dict()
    base = {k: v.detach().to("cpu", torch.float32) for k, v in den.state_dict().items() if k in wanted}
    missing = merged.load_state_dict(base, strict=False).missing_keys
    if missing:
        raise RuntimeError(f"base weights missing from the training denoiser: {missing[:5]} ...")
    apply_adapter(merged, spec, "student", teacher.family)
    load_adapter_state_dict(merged, "student", {k: v.detach().cpu() for k, v in student_state.items()})
    set_adapter(merged, "student")
    merge_adapter(merged, "student")  # merged in fp32, cast once at the end
    remove_adapters(merged)
    if dtype != torch.float32:
        merged = merged.to(dtype)
    return merged.eval().requires_grad_(False)


def _copy_text_encoder(teacher: Teacher, out: Path) -> None:
    """The teacher's text encoder folders (``text_encoder``; SDXL: ``text_encoder_2`` too) and their
    ``model_index.json`` entries, unchanged."""
    parts = ("text_encoder", "text_encoder_2") if teacher.family == "sdxl" else ("text_encoder",)
    if teacher.family == "sd3":  # CLIP-L, CLIP-G and T5 (if the teacher has one)
        parts = tuple(p for p in ("text_encoder", "text_encoder_2", "text_encoder_3")
                      if teacher.root is None or (teacher.root / p).is_dir())
    if teacher.root is None or not all((teacher.root / part).is_dir() for part in parts):
        raise ValueError("the teacher was loaded without its text encoder and without a local folder to copy it "
                         "from: load it with load_teacher(..., text_encoder=True) to export")
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    teacher_index = json.loads((teacher.root / "model_index.json").read_text())
    for part in parts:
        shutil.copytree(teacher.root / part, out / part, dirs_exist_ok=True)
        index[part] = teacher_index[part]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _sdxl_pipeline(teacher: Teacher, unet: nn.Module, scheduler: Any) -> Any:
    """A ``StableDiffusionXLPipeline`` of the teacher's text side and VAE around ``unet``; the null-prompt
    choice (``force_zeros_for_empty_prompt``) is the teacher's, no watermarker (no extra dependency)."""
    from diffusers import StableDiffusionXLPipeline  # noqa: PLC0415 -- diffusers models: seconds to import

    enc, tok = teacher.text_encoder, teacher.tokenizer
    return StableDiffusionXLPipeline(
        vae=teacher.vae, text_encoder=None if enc is None else enc.text_encoder,
        text_encoder_2=None if enc is None else enc.text_encoder_2, tokenizer=tok.tokenizer,
        tokenizer_2=tok.tokenizer_2, unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=teacher.zero_null_prompt, add_watermarker=False)


def one_step_flow_scheduler(teacher_scheduler: Any) -> Any:
    """The teacher's FlowMatchEulerDiscreteScheduler (same ``shift``) with every option that would move a
    1-step schedule's sigma off 1 switched off: ``num_inference_steps=1`` then calls the transformer at
    timestep T (sigma = 1, x_s = z) and steps z + (0 - 1) v, i.e. x0 = z - v, the distiller's generator."""
    from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: PLC0415 -- diffusers models: seconds to import

    return FlowMatchEulerDiscreteScheduler.from_config(
        teacher_scheduler.config, shift_terminal=None, use_karras_sigmas=False, use_exponential_sigmas=False,
        use_beta_sigmas=False, invert_sigmas=False, stochastic_sampling=False)


def _sd3_pipeline(teacher: Teacher, transformer: nn.Module, scheduler: Any) -> Any:
    """A ``StableDiffusion3Pipeline`` of the teacher's three text encoders, tokenizers and VAE around ``transformer``."""
    from diffusers import StableDiffusion3Pipeline  # noqa: PLC0415 -- diffusers models: seconds to import

    enc, tok = teacher.text_encoder, teacher.tokenizer
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=teacher.vae,
        text_encoder=None if enc is None else enc.clip_l, tokenizer=tok.clip_l,
        text_encoder_2=None if enc is None else enc.clip_g, tokenizer_2=tok.clip_g,
        text_encoder_3=None if enc is None else enc.t5, tokenizer_3=tok.t5)


def export_one_step_pipeline(source: Any, out_dir: str | os.PathLike, *, cfg: VSDConfig | None = None,
                             student_state: Mapping[str, Tensor] | None = None,
                             fake_state: Mapping[str, Tensor] | None = None,
                             dtype: torch.dtype | None = None) -> Path:
    """Write a merged one-step pipeline to ``out_dir`` (plus ``adapters/*.safetensors``).

    ``source`` is a ``WaDiDistiller`` or a ``Teacher`` (then pass ``cfg`` and ``student_state``,
    e.g. from a DeepSpeed engine's ``adapter_modules`` state).
    """
    if isinstance(source, Teacher):
        teacher = source
        if cfg is None or student_state is None:
            raise ValueError("exporting from a Teacher needs cfg= and student_state=")
    else:  # a WaDiDistiller
        teacher, cfg = source.teacher, cfg or source.cfg
        student_state = student_state or adapter_state_dict(teacher.denoiser, "student")
        fake_state = fake_state or adapter_state_dict(teacher.denoiser, "fake")
    if cfg.student_timestep != teacher.num_train_timesteps - 1:
        raise ValueError(f"the one-step export starts at t={teacher.num_train_timesteps - 1}, but the student was "
                         f"trained at t={cfg.student_timestep}: train with student_timestep=T-1")

    alphabar = resolve_student_alphabar(cfg, teacher.alphas_cumprod, teacher.prediction_type)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    denoiser = merged_student_denoiser(teacher, cfg.student, student_state, dtype)
    if teacher.prediction_type == "flow":
        if teacher.family == "pixart":
            raise ValueError("a flow-matching PixArt teacher has no diffusers pipeline to export to: use the student "
                             "adapter file (adapters/student.safetensors) with this code base")
        # SD3: the stock pipeline reproduces x0. A flow UNet (the toy flow teacher) is saved as a
        # StableDiffusionPipeline folder that load_teacher + wadi_core.models.flow.sample_flow sample;
        # diffusers' SD pipeline itself cannot step a flow scheduler (wadi_export.json says so).
        scheduler = one_step_flow_scheduler(teacher.scheduler)
    else:
        scheduler = one_step_scheduler(teacher.scheduler, alphabar)
    if teacher.family == "sd3":
        pipe = _sd3_pipeline(teacher, denoiser, scheduler)
    elif teacher.family == "sdxl":
        pipe = _sdxl_pipeline(teacher, denoiser, scheduler)
    elif teacher.family == "pixart":
        from diffusers import PixArtAlphaPipeline  # noqa: PLC0415 -- diffusers models: seconds to import

        pipe = PixArtAlphaPipeline(tokenizer=teacher.tokenizer, text_encoder=teacher.text_encoder,
                                   vae=teacher.vae, transformer=denoiser, scheduler=scheduler)
    else:
        from diffusers import StableDiffusionPipeline  # noqa: PLC0415 -- diffusers models: seconds to import

        pipe = StableDiffusionPipeline(
            vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer, unet=denoiser,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    if teacher.text_encoder is None:  # trained with its text encoder elsewhere: copy the teacher's files
        _copy_text_encoder(teacher, out)
    save_adapter_file(out / "adapters" / "student.safetensors", student_state, cfg.student, teacher.family, "student",
                      student_alphabar=alphabar)
    if fake_state is not None:
        save_adapter_file(out / "adapters" / "fake.safetensors", fake_state, cfg.fake, teacher.family, "fake")
    info = {"format": "wadi-one-step/1", "teacher": teacher.source, "family": teacher.family,
            "student_timestep": cfg.student_timestep, "student_alphabar": alphabar, "sample_with": {"num_inference_steps": 1, "guidance_scale": 1.0},
            **({"sampler": "wadi_core.models.flow.sample_flow (a flow UNet: diffusers' StableDiffusionPipeline cannot step "
                           "its FlowMatchEulerDiscreteScheduler)"}
               if teacher.prediction_type == "flow" and teacher.family != "sd3" else {}),
            "vsd": to_flat_dict(cfg)}
    (out / "wadi_export.json").write_text(json.dumps(info, indent=2))
    return out
