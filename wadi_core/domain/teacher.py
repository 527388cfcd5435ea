"""Architecture of the embedded teacher: a tiny Stable Diffusion-format pipeline.

32x32 RGB images, an ``AutoencoderKL`` to 8x8x4 latents, a 2-layer x 64 ``CLIPTextModel`` with
the domain tokenizer, a 1.76 M-parameter ``UNet2DConditionModel`` with cross-attention (three
resolution levels, 8x8 -> 4x4 -> 2x2), and SD's
noise schedule (scaled-linear betas 0.00085..0.012 over 1000 steps). Sampling uses DDIM with
"trailing" timestep spacing, so a 1-step sample starts at t = 999.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import multiprocessing as mp
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from wadi_core.domain import TEACHER_GUIDANCE, TEACHER_STEPS

__all__ = ["sample_images", "sample_images_parallel", "folder_size_mb", "TeacherArch", "build_vae", "build_text_encoder", "build_unet", "build_scheduler",
           "build_training_scheduler", "assemble_pipeline", "SCHEDULE"]

# SD 1.x noise schedule (shared by training and sampling).
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", clip_sample=False)


@dataclasses.dataclass(frozen=True)
class TeacherArch:
    """Sizes of the embedded teacher's components."""

    image_size: int = 32              # image side in pixels (latent side: image_size / 2^(len(vae_channels) - 1))
    latent_channels: int = 4          # channels of the VAE latent (the UNet's input and output)
    vae_channels: tuple[int, ...] = (32, 64, 64)  # VAE block widths; each level after the first halves the side
    text_hidden: int = 64             # CLIP text encoder width (MLP 4x), also the UNet's cross-attention dim
    text_layers: int = 2              # CLIP text encoder layers
    text_heads: int = 4               # CLIP text encoder attention heads
    max_tokens: int = 32              # prompt length in tokens (tokenizer max length, text position embeddings)
    unet_channels: tuple[int, ...] = (32, 64, 64)  # 8x8 -> 4x4 -> 2x2: the 2x2 level knows where 'left' is
    unet_layers_per_block: int = 1    # resnet + cross-attention layers per UNet down block
    unet_heads: int = 4               # attention heads of the UNet's cross-attention (diffusers' attention_head_dim)


def build_vae(arch: TeacherArch):
    from diffusers import AutoencoderKL  # noqa: PLC0415 -- diffusers models: seconds to import

    n = len(arch.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=arch.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=arch.vae_channels, layers_per_block=1, norm_num_groups=16,
        sample_size=arch.image_size,
    )


def build_text_encoder(arch: TeacherArch, vocab_size: int, bos_id: int, eos_id: int):
    from transformers import CLIPTextConfig, CLIPTextModel  # noqa: PLC0415 -- transformers: seconds to import

    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=arch.text_hidden, intermediate_size=4 * arch.text_hidden,
        num_hidden_layers=arch.text_layers, num_attention_heads=arch.text_heads,
        max_position_embeddings=arch.max_tokens, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        projection_dim=arch.text_hidden,
    )
    return CLIPTextModel(cfg)


def build_unet(arch: TeacherArch):
    from diffusers import UNet2DConditionModel  # noqa: PLC0415 -- diffusers models: seconds to import

    n = len(arch.unet_channels)
    return UNet2DConditionModel(
        sample_size=arch.image_size // 2 ** (len(arch.vae_channels) - 1),
        in_channels=arch.latent_channels, out_channels=arch.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        block_out_channels=arch.unet_channels, layers_per_block=arch.unet_layers_per_block,
        cross_attention_dim=arch.text_hidden, attention_head_dim=arch.unet_heads, norm_num_groups=16,
    )


def build_training_scheduler():
    """DDPM with SD's schedule: ``add_noise`` for training."""
    from diffusers import DDPMScheduler  # noqa: PLC0415 -- diffusers models: seconds to import

    return DDPMScheduler(**SCHEDULE)


def build_scheduler(prediction_type: str = "epsilon"):
    """The pipeline's sampler: DDIM, SD's schedule, trailing spacing (1 step starts at t=999).

    ``prediction_type`` is what the UNet predicts: ``"epsilon"`` (SD 1.5) or ``"v_prediction"`` (SD 2.1).
    """
    from diffusers import DDIMScheduler  # noqa: PLC0415 -- diffusers models: seconds to import

    return DDIMScheduler(**{**SCHEDULE, "prediction_type": prediction_type}, set_alpha_to_one=False, steps_offset=1,
                         timestep_spacing="trailing")


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler=None):
    """A complete ``StableDiffusionPipeline`` (no safety checker) from the parts."""
    from diffusers import StableDiffusionPipeline  # noqa: PLC0415 -- diffusers models: seconds to import

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler or build_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def folder_size_mb(path: str | os.PathLike) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def sample_images(pipe, prompts: list[str], steps: int = TEACHER_STEPS, guidance: float = TEACHER_GUIDANCE, seed: int = 0,
                  batch: int = 256, progress: bool = False):
    """Generate one image per prompt with the pipeline; float [0,1] tensor (B,3,H,W)."""
    import torch  # noqa: PLC0415 -- torch only here; the module imports without it

    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in tqdm(range(0, len(prompts), batch), desc=f"sample {steps} steps", disable=not progress):
        g = torch.Generator().manual_seed(seed + i)
        res = pipe(list(prompts[i:i + batch]), num_inference_steps=steps, guidance_scale=guidance,
                   generator=g, output_type="pt")
        out.append(res.images.float().clamp(0, 1))
    return torch.cat(out)


def _sample_chunk(args: tuple) -> "Any":
    import torch  # noqa: PLC0415 -- torch only here; the module imports without it
    from diffusers import StableDiffusionPipeline  # noqa: PLC0415 -- diffusers models: seconds to import

    teacher_dir, prompts, steps, guidance, seed, batch = args
    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(teacher_dir)
    return sample_images(pipe, prompts, steps=steps, guidance=guidance, seed=seed, batch=batch)


def sample_images_parallel(teacher_dir: str, prompts: list[str], steps: int = TEACHER_STEPS, guidance: float = TEACHER_GUIDANCE,
                           seed: int = 0, batch: int = 250, workers: int = 2):
    """``sample_images`` split over ``workers`` spawned processes (one thread each); same result
    as one process, since every batch is seeded by its start index."""
    import torch  # noqa: PLC0415 -- torch only here; the module imports without it

    chunk = -(-len(prompts) // workers)
    chunk = -(-chunk // batch) * batch  # whole batches per worker keep the seeds aligned
    jobs = [(str(teacher_dir), prompts[i:i + chunk], steps, guidance, seed + i, batch)
            for i in range(0, len(prompts), chunk)]
    with cf.ProcessPoolExecutor(len(jobs), mp_context=mp.get_context("spawn")) as pool:
        return torch.cat(list(pool.map(_sample_chunk, jobs)))
