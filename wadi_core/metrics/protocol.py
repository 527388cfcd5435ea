"""The extractor / scorer interfaces and the image protocol shared by every metric.

Image protocol (GigaGAN / DMD2 COCO-30k, docs/EVALUATION.md): every image, real or
generated, is center-cropped to its short side and resized with PIL LANCZOS to 256x256
(:func:`protocol_resize`); each metric then applies its own preprocessing (clean-fid's
:func:`clean_resize` to 299 for Inception, open_clip's transforms for CLIP / HPS).
"""

from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

__all__ = [
    "FeatureExtractor",
    "PromptScorer",
    "center_crop_square",
    "protocol_resize",
    "clean_resize",
    "to_uint8",
    "tensor_to_pils",
    "pils_to_tensor",
]


@runtime_checkable
class FeatureExtractor(Protocol):
    """Image features for FID / precision-recall."""

    name: str
    feature_dim: int

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images: float in [0, 1], (B, 3, H, W), any size -> (B, feature_dim)."""
        ...


@runtime_checkable
class PromptScorer(Protocol):
    """Per-image text-image alignment score (CLIP score, HPS, the domain's attribute score)."""

    name: str

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """images: float in [0, 1], (B, 3, H, W); one prompt per image -> (B,)."""
        ...


def center_crop_square(img: Image.Image) -> Image.Image:
    """Crop the centred square whose side is the image's short side."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


def protocol_resize(img: Image.Image, size: int = 256) -> Image.Image:
    """COCO protocol: RGB, center crop to the short side, PIL LANCZOS to ``size`` x ``size``."""
    img = center_crop_square(img.convert("RGB"))
    if img.size != (size, size):
        img = img.resize((size, size), resample=Image.Resampling.LANCZOS)
    return img


def clean_resize(image: np.ndarray, size: int = 299) -> np.ndarray:
    """clean-fid's "clean" resize of one (H, W, 3) image in [0, 255] -> float32 (size, size, 3).

    Per channel: float32 PIL image ("F" mode), bicubic, clipped to [0, 255], not quantized.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    channels = []
    for c in range(3):
        ch = Image.fromarray(np.ascontiguousarray(image[:, :, c], dtype=np.float32), mode="F")
        ch = ch.resize((size, size), resample=Image.Resampling.BICUBIC)
        channels.append(np.asarray(ch, dtype=np.float32).clip(0, 255))
    return np.stack(channels, axis=2)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [0, 1] (B, 3, H, W) -> uint8 (B, H, W, 3), rounded (exact for images read from PNG)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected float images (B, 3, H, W), got shape {tuple(images.shape)}")
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def tensor_to_pils(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(a) for a in to_uint8(images)]


def pils_to_tensor(images: Iterable[Image.Image]) -> torch.Tensor:
    """List of same-size PIL images -> float [0, 1] (B, 3, H, W)."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
