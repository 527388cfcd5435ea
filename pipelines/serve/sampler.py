"""Prompts and seeds -> PNG bytes with a diffusers pipeline: the one-step export, or a teacher with N steps and CFG.

Each prompt gets its own CPU ``torch.Generator`` seeded with the request's seed, so the same prompt
and seed give the same image whatever else is in the batch and on any device (the noise is drawn
on the CPU, as in ``pipelines/tracking/one_step_model.py``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["Sampler", "pick_device_dtype", "encode_png"]

_DTYPES = ("auto", "float32", "float16", "bfloat16")


def pick_device_dtype(dtype: str = "auto", device: str | None = None) -> tuple[str, torch.dtype]:
    """CUDA when there is one; ``dtype`` "auto" is float16 there (half the memory, tensor cores) and float32 on CPU."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    return device, getattr(torch, dtype)


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes; compression level 1: the images are small and latency matters more."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class Sampler:
    """A diffusers pipeline loaded once; ``steps`` 1 and ``guidance`` 1 for the exported student."""

    def __init__(self, model_dir: str | os.PathLike, steps: int = 1, guidance: float = 1.0, dtype: str = "auto",
                 device: str | None = None):
        from diffusers import DDIMScheduler, DiffusionPipeline  # noqa: PLC0415 -- diffusers loads with a model

        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if guidance < 1.0:
            raise ValueError(f"guidance must be >= 1 (1 = no classifier-free guidance), got {guidance}")
        self.device, self.dtype = pick_device_dtype(dtype, device)
        self.steps, self.guidance = steps, guidance
        self.pipe = DiffusionPipeline.from_pretrained(Path(model_dir), torch_dtype=self.dtype).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        if steps > 1:  # a teacher: DDIM "trailing" ending on x0, the sampler the evaluation uses for it
            self.pipe.scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config, timestep_spacing="trailing",
                                                            set_alpha_to_one=True)

    @property
    def threads(self) -> int:
        """torch's intra-op threads in this process (the caller sets them, e.g. from the replica's CPUs)."""
        return torch.get_num_threads()

    @torch.inference_mode()
    def images(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        """uint8 images (B, H, W, 3), the noise of image i from ``torch.Generator().manual_seed(seeds[i])``."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        out = self.pipe(list(prompts), num_inference_steps=self.steps, guidance_scale=self.guidance,
                        generator=generators, output_type="np")
        return (np.asarray(out.images, dtype=np.float32) * 255).round().clip(0, 255).astype(np.uint8)

    def pngs(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[bytes]:
        """PNG bytes per prompt."""
        return [encode_png(im) for im in self.images(prompts, seeds)]
