"""SDXL specifics: two CLIP text encoders, pooled text embeddings, and the UNet's added time ids.

Text is encoded as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` does (no clip skip):
each prompt goes through CLIP ViT-L (``text_encoder``) and OpenCLIP bigG (``text_encoder_2``,
with projection), 77 tokens each, no attention mask; the token embeddings are both encoders'
penultimate hidden states concatenated (768 + 1280 = 2048 wide) and the pooled embedding is
``text_encoder_2``'s projected ``text_embeds`` (1280). The time ids are not text: the UNet call
builds them from the latent size (original size = target size = latent * VAE factor, crop (0, 0)),
as the diffusers pipeline does at its default size and DMD2's SDXL training does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from wadi_core.models.teacher import Cond

__all__ = ["SDXLTextEncoders", "SDXLTokenizers", "encode_sdxl_text", "sdxl_added_cond_kwargs",
           "load_sdxl_text_encoders", "load_sdxl_tokenizers", "zero_null_prompt", "TEXT_PARTS"]

#: The pipeline folders that hold SDXL's text side (all copied / downloaded together).
TEXT_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


class SDXLTextEncoders(nn.Module):
    """SDXL's two frozen text encoders held as one module (moved, frozen and cast together)."""

    def __init__(self, text_encoder: nn.Module, text_encoder_2: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder  # CLIP ViT-L/14 (CLIPTextModel)
        self.text_encoder_2 = text_encoder_2  # OpenCLIP bigG/14 (CLIPTextModelWithProjection)

    @property
    def config(self) -> Any:
        """``text_encoder_2``'s config (its 77-token context is the one both tokenizers use)."""
        return self.text_encoder_2.config


@dataclass
class SDXLTokenizers:
    """SDXL's two tokenizers (same BPE; ``tokenizer_2`` pads with "!" in the published checkpoint)."""

    tokenizer: Any
    tokenizer_2: Any

    @property
    def model_max_length(self) -> int:
        return int(min(self.tokenizer.model_max_length, self.tokenizer_2.model_max_length))


@torch.no_grad()
def encode_sdxl_text(encoders: SDXLTextEncoders, tokenizers: SDXLTokenizers, max_length: int,
                     prompts: list[str]) -> "Cond":
    """Prompts -> ``Cond(embeds (B, 77, 2048), pooled=(B, 1280))`` in the encoders' dtype, as
    ``StableDiffusionXLPipeline.encode_prompt`` (penultimate hidden states, no mask)."""
    from wadi_core.models.teacher import Cond  # noqa: PLC0415 -- teacher imports this module

    hidden: list[Tensor] = []
    for tokenizer, encoder in ((tokenizers.tokenizer, encoders.text_encoder),
                               (tokenizers.tokenizer_2, encoders.text_encoder_2)):
        ids = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer of both
    pooled = out.text_embeds  # text_encoder_2's projected pooled output (the last loop iteration)
    return Cond(torch.cat(hidden, dim=-1), None, pooled)


def vae_scale_factor(vae: nn.Module) -> int:
    """Pixels per latent cell: 2 ** (VAE blocks - 1), as diffusers' pipelines compute it (8 for SDXL)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def sdxl_added_cond_kwargs(cond: "Cond", x_t: Tensor, vae: nn.Module) -> dict[str, Tensor]:
    """The UNet's ``added_cond_kwargs``: pooled ``text_embeds`` and ``time_ids`` = (H, W, 0, 0, H, W)
    in pixels for ``x_t``'s latent size (SDXL's default micro-conditioning: no crop, target = original)."""
    if cond.pooled is None:
        raise ValueError("an SDXL UNet needs pooled text embeddings, and this Cond has none (pooled=None): "
                         "encode the prompts with the SDXL teacher (Teacher.encode_prompts) or, for "
                         "precomputed embeddings, pass Cond(embeds, None, pooled)")
    f = vae_scale_factor(vae)
    h, w = int(x_t.shape[-2]) * f, int(x_t.shape[-1]) * f
    time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=cond.embeds.dtype, device=x_t.device)
    return {"text_embeds": cond.pooled.to(x_t.device), "time_ids": time_ids.expand(x_t.shape[0], -1)}


def zero_null_prompt(index: dict[str, Any]) -> bool:
    """``force_zeros_for_empty_prompt`` of an SDXL ``model_index.json`` (diffusers' default: True).

    When set, the unconditional branch of classifier-free guidance is all zeros (token and pooled
    embeddings) rather than the encoded empty prompt: what ``StableDiffusionXLPipeline`` does
    without a negative prompt, and what DMD2's SDXL training uses as its null prompt.
    """
    return bool(index.get("force_zeros_for_empty_prompt", True))


def load_sdxl_text_encoders(index: dict[str, Any], folders: dict[str, Path], dtype: torch.dtype,
                            component_class: Any, **kwargs: Any) -> SDXLTextEncoders:
    """Both text encoders from their folders (``folders``: part name -> local directory)."""
    encoders = [component_class(index, part).from_pretrained(folders[part], torch_dtype=dtype, **kwargs)
                for part in ("text_encoder", "text_encoder_2")]
    if not hasattr(encoders[1].config, "projection_dim"):
        raise ValueError(f"text_encoder_2 is a {type(encoders[1]).__name__}: SDXL's second encoder must be "
                         "a CLIPTextModelWithProjection (its pooled, projected output conditions the UNet)")
    return SDXLTextEncoders(*encoders)


def load_sdxl_tokenizers(index: dict[str, Any], folders: dict[str, Path], component_class: Any) -> SDXLTokenizers:
    """Both tokenizers from their folders."""
    return SDXLTokenizers(*(component_class(index, part).from_pretrained(folders[part])
                            for part in ("tokenizer", "tokenizer_2")))
