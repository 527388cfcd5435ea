"""Denoisers built on the meta device from config only (dry runs, parameter counts, no weights)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wadi_core.models.teacher import EMBEDDED_TEACHER

__all__ = ["DENOISER_CONFIGS", "denoiser_config", "build_denoiser_on_meta", "family_of_config"]

_SD15_UNET: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
_SD21_UNET: dict[str, Any] = {
    **_SD15_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
    "use_linear_projection": True, "upcast_attention": True, "sample_size": 96,
}
_PIXART_256: dict[str, Any] = {
    "_class_name": "PixArtTransformer2DModel",
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8,
    "num_layers": 28, "cross_attention_dim": 1152, "attention_bias": True, "sample_size": 32,
    "patch_size": 2, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-06,
    "caption_channels": 4096, "interpolation_scale": 0.5, "use_additional_conditions": False,
}
_PIXART_512: dict[str, Any] = {**_PIXART_256, "sample_size": 64, "interpolation_scale": 1}
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (2,567,463,684 parameters): three levels,
# 1 / 2 / 10 transformer layers, 64-wide heads, 2048-wide text (CLIP-L 768 + OpenCLIP bigG 1280), and the
# "text_time" added embedding: 6 time ids x 256 + the 1280 pooled text embedding = 2816 inputs.
_SDXL_UNET: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}

#: Public architectures by short name (configs as published in the diffusers checkpoints).
DENOISER_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": _SD15_UNET, "sd21": _SD21_UNET, "sd21-base": {**_SD21_UNET, "sample_size": 64},
    "pixart-256": _PIXART_256, "pixart-512": _PIXART_512, "sdxl": _SDXL_UNET,
}


def denoiser_config(family_or_config: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """Resolve a short name, "embedded", a config dict, a config.json or a diffusers dir to a config."""
    if isinstance(family_or_config, dict):
        return dict(family_or_config)
    key = str(family_or_config)
    if key in DENOISER_CONFIGS:
        return dict(DENOISER_CONFIGS[key])
    if key in ("embedded", "embedded_teacher"):
        key = str(EMBEDDED_TEACHER)
    path = Path(key)
    for candidate in (path, path / "unet" / "config.json", path / "transformer" / "config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise ValueError(
        f"unknown denoiser {family_or_config!r}: use one of {sorted(DENOISER_CONFIGS)}, 'embedded', "
        "a config dict, a config.json or a diffusers pipeline directory"
    )


# stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json (2,028,328,000 parameters): 24 joint
# blocks, 24 heads x 64 = 1536 wide, patch 2 on 16 latent channels, T5-width (4096) joint text, pooled
# CLIP-L + CLIP-G (768 + 1280 = 2048).
_SD3_MEDIUM: dict[str, Any] = {
    "_class_name": "SD3Transformer2DModel",
    "attention_head_dim": 64, "caption_projection_dim": 1536, "in_channels": 16, "joint_attention_dim": 4096,
    "num_attention_heads": 24, "num_layers": 24, "out_channels": 16, "patch_size": 2,
    "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "sample_size": 128,
}
DENOISER_CONFIGS["sd3-medium"] = _SD3_MEDIUM


def family_of_config(config: dict[str, Any]) -> str:
    """"pixart" for DiT configs, "sdxl" for UNets with SDXL's "text_time" added conditioning, "sd" for UNets."""
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if config.get("_class_name") == "SD3Transformer2DModel" or "joint_attention_dim" in config:
        return "sd3"
    return "pixart" if "Transformer" in str(config.get("_class_name", "")) or "patch_size" in config else "sd"


def build_denoiser_on_meta(family_or_config: str | os.PathLike | dict[str, Any]) -> nn.Module:
    """The denoiser architecture with parameters on the meta device (no memory, no weights)."""
    from diffusers import PixArtTransformer2DModel, UNet2DConditionModel  # noqa: PLC0415 -- slow import

    config = denoiser_config(family_or_config)
    cls = PixArtTransformer2DModel if family_of_config(config) == "pixart" else UNet2DConditionModel
    if family_of_config(config) == "sd3":
        from diffusers import SD3Transformer2DModel  # noqa: PLC0415 -- diffusers models: seconds to import

        cls = SD3Transformer2DModel
    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        return cls.from_config(clean)
