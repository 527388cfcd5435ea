"""Teacher loading (SD-family UNets and PixArt-alpha DiTs behind one interface)."""

from wadi_core.models.meta import DENOISER_CONFIGS, build_denoiser_on_meta, denoiser_config, family_of_config
from wadi_core.models.teacher import (EMBEDDED_TEACHER, Cond, PromptEncoder, Teacher, encode_text, load_prompt_encoder,
                                     load_teacher, resolve_teacher_dir)

__all__ = [
    "EMBEDDED_TEACHER", "Cond", "Teacher", "load_teacher", "resolve_teacher_dir",
    "PromptEncoder", "load_prompt_encoder", "encode_text",
    "DENOISER_CONFIGS", "build_denoiser_on_meta", "denoiser_config", "family_of_config",
]
