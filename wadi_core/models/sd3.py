"""SD3-style MMDiT teachers: the three text encoders, the transformer call and the flow noise grid.

Everything here is what ``Teacher`` needs for ``family == "sd3"`` (``StableDiffusion3Pipeline``
folders): prompts are encoded exactly as diffusers' ``StableDiffusion3Pipeline.encode_prompt``
(penultimate CLIP-L and CLIP-G hidden states concatenated and zero-padded to T5's width, then T5's
sequence after them; pooled = CLIP-L and CLIP-G projected pooled outputs concatenated).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from wadi_core.models.teacher import Cond

__all__ = ["SD3_T5_LENGTH", "SD3TextEncoders", "SD3Tokenizers", "encode_sd3_prompts", "sd3_velocity",
           "load_sd3_text_encoders", "load_sd3_tokenizers", "TEXT_PARTS"]

#: T5 tokens of the joint sequence (``StableDiffusion3Pipeline``'s ``max_sequence_length`` default).
SD3_T5_LENGTH = 256

#: The pipeline folders that hold SD3's text side (all copied / downloaded together).
TEXT_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


class SD3Tokenizers(NamedTuple):
    """CLIP-L, CLIP-G and T5 tokenizers (``tokenizer``, ``tokenizer_2``, ``tokenizer_3``)."""

    clip_l: Any
    clip_g: Any
    t5: Any


class SD3TextEncoders(nn.Module):
    """CLIP-L and CLIP-G (``CLIPTextModelWithProjection``) and T5; ``t5=None`` gives zeros in its
    place, as diffusers does without ``text_encoder_3``. ``joint_dim``: the transformer's
    ``joint_attention_dim`` (4096 for SD3-medium)."""

    def __init__(self, clip_l: nn.Module, clip_g: nn.Module, t5: nn.Module | None, joint_dim: int) -> None:
        super().__init__()
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.joint_dim = int(joint_dim)

    @property
    def config(self) -> Any:
        """CLIP-L's config (its tokenizer's 77 tokens are the CLIP length of both CLIPs)."""
        return self.clip_l.config


def _clip_embeds(encoder: nn.Module, tokenizer: Any, prompts: list[str], length: int) -> tuple[Tensor, Tensor]:
    """(penultimate hidden states (B, L, D), projected pooled output (B, P)) as diffusers' SD3 pipeline."""
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    out = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
    return out.hidden_states[-2], out[0]


@torch.no_grad()
def encode_sd3_prompts(encoders: SD3TextEncoders, tokenizers: SD3Tokenizers, t5_length: int,
                       prompts: list[str]) -> "Cond":
    """Prompts -> ``Cond(embeds (B, 77 + t5_length, joint_dim), pooled=(B, P_L + P_G))`` in CLIP-L's
    dtype, exactly as ``StableDiffusion3Pipeline.encode_prompt`` (no clip_skip, no mask)."""
    from wadi_core.models.teacher import Cond  # noqa: PLC0415 -- teacher imports this module

    prompts = list(prompts)
    clip_len = int(tokenizers.clip_l.model_max_length)  # diffusers uses tokenizer 1's length for both
    dtype = next(encoders.clip_l.parameters()).dtype
    h_l, p_l = _clip_embeds(encoders.clip_l, tokenizers.clip_l, prompts, clip_len)
    h_g, p_g = _clip_embeds(encoders.clip_g, tokenizers.clip_g, prompts, clip_len)
    clip = torch.cat([h_l.to(dtype), h_g.to(dtype)], dim=-1)
    device = clip.device
    if encoders.t5 is None:
        t5 = torch.zeros(len(prompts), t5_length, encoders.joint_dim, device=device, dtype=dtype)
    else:
        ids = tokenizers.t5(prompts, padding="max_length", max_length=t5_length, truncation=True,
                            add_special_tokens=True, return_tensors="pt").input_ids
        t5 = encoders.t5(ids.to(next(encoders.t5.parameters()).device))[0].to(device, dtype)
    if clip.shape[-1] > t5.shape[-1]:
        raise ValueError(f"CLIP-L + CLIP-G width {clip.shape[-1]} exceeds the T5 / joint width {t5.shape[-1]}: "
                         "the text encoders do not belong to this SD3 transformer")
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return Cond(torch.cat([clip, t5], dim=-2), None, torch.cat([p_l, p_g], dim=-1).to(dtype))


def sd3_velocity(transformer: nn.Module, x_s: Tensor, timestep: Tensor, cond: "Cond") -> Tensor:
    """The SD3 transformer's velocity at flow latents ``x_s`` and timesteps sigma * T (float)."""
    if cond.pooled is None:
        raise ValueError("an SD3 transformer needs the pooled text embeddings (Cond.pooled): encode the prompts "
                         "with the teacher's three text encoders (Teacher.encode_prompts / load_prompt_encoder)")
    return transformer(hidden_states=x_s, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled,
                       timestep=timestep, return_dict=False)[0]


def load_sd3_tokenizers(index: dict[str, Any], folders: dict[str, Path], component_class: Any) -> SD3Tokenizers:
    """The three tokenizers (``folders``: part name -> local directory; T5's None without text_encoder_3)."""
    def load(part: str) -> Any:
        entry = index.get(part)
        return None if not entry or entry[1] is None else component_class(index, part).from_pretrained(folders[part])

    return SD3Tokenizers(*(load(part) for part in ("tokenizer", "tokenizer_2", "tokenizer_3")))


def load_sd3_text_encoders(index: dict[str, Any], folders: dict[str, Path], dtype: torch.dtype,
                           component_class: Any, joint_dim: int | None = None, **kwargs: Any) -> SD3TextEncoders:
    """CLIP-L, CLIP-G and T5 from their folders (T5 None when ``model_index.json`` has no text_encoder_3,
    as diffusers allows). ``joint_dim``: the transformer's ``joint_attention_dim`` (default: T5's width)."""
    def load(part: str) -> nn.Module | None:
        entry = index.get(part)
        if not entry or entry[1] is None:
            return None
        return component_class(index, part).from_pretrained(folders[part], torch_dtype=dtype, **kwargs)

    clip_l, clip_g, t5 = (load(part) for part in ("text_encoder", "text_encoder_2", "text_encoder_3"))
    if clip_l is None or clip_g is None:
        raise ValueError("model_index.json lacks text_encoder or text_encoder_2: an SD3 teacher needs both CLIP encoders")
    for name, enc in (("text_encoder", clip_l), ("text_encoder_2", clip_g)):
        if not hasattr(enc.config, "projection_dim"):
            raise ValueError(f"{name} is a {type(enc).__name__}: SD3's CLIP encoders must be "
                             "CLIPTextModelWithProjection (their projected pooled outputs condition the transformer)")
    if joint_dim is None:
        if t5 is None:
            raise ValueError("an SD3 pipeline without text_encoder_3 needs joint_dim= (the transformer's "
                             "joint_attention_dim) for the zero T5 embeddings")
        joint_dim = int(t5.config.d_model)
    return SD3TextEncoders(clip_l, clip_g, t5, joint_dim)
