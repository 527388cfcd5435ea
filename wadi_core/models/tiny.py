"""Tiny SD / PixArt pipelines built offline from configs (tests, benchmarks, dry runs).

Nothing is downloaded: tokenizers are written from an in-code vocabulary (transformers 5's
``CLIPTokenizer(vocab_file=...)`` trap is avoided by ``from_pretrained`` on written files).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from wadi_core.domain.tokenizer import bytes_to_unicode

__all__ = ["tiny_clip_tokenizer", "tiny_t5_tokenizer", "build_tiny_sd_pipeline",
           "build_tiny_pixart_pipeline", "save_tiny_pipeline", "build_tiny_sdxl_pipeline",
           "build_tiny_sd3_pipeline"]


def tiny_clip_tokenizer():
    """A character-level CLIPTokenizer (514 tokens: 2 x 256 byte symbols + bos/eos), offline."""
    from transformers import CLIPTokenizer  # noqa: PLC0415 -- transformers: seconds to import

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(d, model_max_length=77)


def tiny_t5_tokenizer():
    """A character-level Unigram T5Tokenizer, offline."""
    from transformers import T5Tokenizer  # noqa: PLC0415 -- transformers: seconds to import

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789,.-'"
    pieces += [(c, -3.0) for c in alphabet] + [("\u2581" + c, -2.5) for c in alphabet]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=120)


def _scheduler(family: str = "sd"):
    from diffusers import DDPMScheduler  # noqa: PLC0415 -- diffusers models: seconds to import

    if family == "pixart":  # PixArt-alpha's linear schedule (alphabar_999 ~ 4.0e-5)
        return DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                             prediction_type="epsilon", clip_sample=False)
    # SD's scaled-linear schedule (alphabar_999 ~ 0.0047).
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                         steps_offset=1)


def _vae(latent_size: int):
    from diffusers import AutoencoderKL  # noqa: PLC0415 -- diffusers models: seconds to import

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, sample_size=latent_size * 4,
    )


def build_tiny_sd_pipeline(seed: int = 0, latent_size: int = 8, width: int = 32):
    """A random StableDiffusionPipeline: UNet (width, 2*width), 8x8x4 latents, 32 px images."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: PLC0415 -- slow import
    from transformers import CLIPTextConfig, CLIPTextModel  # noqa: PLC0415 -- transformers: seconds to import

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=len(tokenizer) - 2,
        eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1,
    ))
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(width, 2 * width), norm_num_groups=min(16, width),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8,
    )
    return StableDiffusionPipeline(
        vae=_vae(latent_size), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_pixart_pipeline(seed: int = 0, latent_size: int = 8):
    """A random PixArtAlphaPipeline: 2-block DiT with learned sigma, tiny T5 encoder."""
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel  # noqa: PLC0415 -- slow import
    from transformers import T5Config, T5EncoderModel  # noqa: PLC0415 -- transformers: seconds to import

    torch.manual_seed(seed)
    tokenizer = tiny_t5_tokenizer()
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=32, sample_size=latent_size, patch_size=2, caption_channels=32,
    )
    return PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=_vae(latent_size),
                               transformer=transformer, scheduler=_scheduler("pixart"))


def save_tiny_pipeline(out_dir: str | os.PathLike, family: str = "sd", seed: int = 0) -> Path:
    """Build a tiny ``family`` ("sd" | "pixart" | "sdxl") pipeline and ``save_pretrained`` it to ``out_dir``."""
    if family == "sdxl":
        pipe = build_tiny_sdxl_pipeline(seed)
    else:
        pipe = build_tiny_sd_pipeline(seed) if family == "sd" else build_tiny_pixart_pipeline(seed)
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_sdxl_pipeline(seed: int = 0, latent_size: int = 8, width: int = 32):
    """A random StableDiffusionXLPipeline: UNet with SDXL's "text_time" added conditioning (pooled
    text embeds + 6 time ids), two tiny CLIP encoders (the second with projection), 8x8x4 latents,
    32 px images, SDXL's Euler scheduler on the scaled-linear schedule."""
    from diffusers import (EulerDiscreteScheduler, StableDiffusionXLPipeline,  # noqa: PLC0415 -- slow import
                           UNet2DConditionModel)
    from transformers import (CLIPTextConfig, CLIPTextModel,  # noqa: PLC0415 -- transformers: seconds to import
                              CLIPTextModelWithProjection)

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    n = len(tokenizer)
    clip = dict(vocab_size=n, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1)
    # CLIP ViT-L's role (768 wide in SDXL) and OpenCLIP bigG's (1280 wide, gelu, projected): distinct widths,
    # as in SDXL, so that a mixed-up encoder or an untransposed projection cannot go unnoticed.
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, **clip))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, projection_dim=40,
                                                                hidden_act="gelu", **clip))
    time_dim = 8
    unet = UNet2DConditionModel(  # SDXL's layout: a plain first block, cross-attention below it
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(width, 2 * width), norm_num_groups=min(16, width),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=32 + 48,  # the two encoders' hidden states side by side
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + 40,  # 6 time ids + text_encoder_2's projection
    )
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", prediction_type="epsilon", steps_offset=1,
                                       timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=_vae(latent_size), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def build_tiny_sd3_pipeline(seed: int = 0, latent_size: int = 8, shift: float = 3.0):
    """A random StableDiffusion3Pipeline: 2-block MMDiT (SD3Transformer2DModel), CLIP-L and CLIP-G with
    projection (16 wide each), T5 (48 wide, the joint width), a flow-matching scheduler with ``shift``, and a
    VAE with SD3's latent shift and scale."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,  # noqa: PLC0415 -- slow import
                           StableDiffusion3Pipeline)
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, T5Config,  # noqa: PLC0415 -- slow import
                              T5EncoderModel)

    torch.manual_seed(seed)
    tokenizer, tokenizer_2, tokenizer_3 = tiny_clip_tokenizer(), tiny_clip_tokenizer(), tiny_t5_tokenizer()

    def clip(width: int) -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=width,
            bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1))

    text_encoder, text_encoder_2 = clip(16), clip(16)
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), d_model=48, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    transformer = SD3Transformer2DModel(
        sample_size=latent_size, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=2 * latent_size)
    vae = _vae(latent_size)
    vae.register_to_config(scaling_factor=1.5305, shift_factor=0.0609)  # SD3's VAE latent normalisation
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
