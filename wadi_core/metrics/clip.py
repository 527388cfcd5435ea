"""CLIP score (open_clip ViT-g-14) and HPSv2 (open_clip ViT-H-14 + HPS checkpoint).

Model names are parameters so tests can use a tiny open_clip architecture; weights come from a
local file or ``s3://`` (never a hub tag: a tag would download).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file

from wadi_core.metrics.protocol import tensor_to_pils
from wadi_core.metrics.weights import resolve_weights

__all__ = ["ClipScorer", "HPSv2Scorer", "hps_preprocess", "OPENAI_MEAN", "OPENAI_STD"]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _open_clip() -> Any:
    try:
        import open_clip  # noqa: PLC0415 -- the optional [eval] extra
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("CLIP/HPS scores need open_clip: pip install 'wadi[eval]'") from e
    return open_clip


def _cosine(model: Any, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    img = model.encode_image(pixels)
    txt = model.encode_text(tokens)
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return (img * txt).sum(-1).float().cpu()



def _batched_cosine(scorer: Any, images: torch.Tensor, texts: list[str], preprocess: Any) -> torch.Tensor:
    """Per-image cosine of ``scorer.model``'s image and text embeddings, ``scorer.batch_size`` at a time."""
    if len(texts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(texts)} prompts")
    pils = tensor_to_pils(images)
    out = []
    for s in range(0, len(pils), scorer.batch_size):
        pixels = torch.stack([preprocess(p) for p in pils[s:s + scorer.batch_size]]).to(scorer.device)
        tokens = scorer.tokenizer(texts[s:s + scorer.batch_size]).to(scorer.device)
        out.append(_cosine(scorer.model, pixels, tokens))
    return torch.cat(out)

class ClipScorer:
    """CLIP score: cosine of ``"A photo depicts " + caption`` and the image, raw (no x100, no clamp).

    The paper's "ViT-G/14" is open_clip ``ViT-g-14`` / ``laion2b_s12b_b42k``; pass that file as
    ``pretrained``. Images (the 256 px protocol images) go through open_clip's validation transform.
    """

    report_scale = 1.0

    def __init__(self, pretrained: str | os.PathLike, model_name: str = "ViT-g-14",
                 device: str | torch.device = "cpu", prefix: str = "A photo depicts ", batch_size: int = 32,
                 expected_sha256: str | None = None):
        open_clip = _open_clip()
        path, self.sha256 = resolve_weights(pretrained, f"open_clip {model_name}", expected_sha256)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=str(path), device=device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.name = f"clip_score_{model_name}"
        self.device, self.prefix, self.batch_size = torch.device(device), prefix, batch_size

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return _batched_cosine(self, images, [self.prefix + p for p in prompts], self.preprocess)


def hps_preprocess(img: Image.Image, size: int = 224) -> torch.Tensor:
    """HPSv2's transform: longest side to ``size`` (bicubic), zero-pad to square, OpenAI mean/std."""
    img = img.convert("RGB")
    w, h = img.size
    scale = size / float(max(h, w))
    if scale != 1.0:  # as hpsv2's ResizeMaxSize: no resize and no pad when already that size
        new_h, new_w = round(h * scale), round(w * scale)
        img = img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
        canvas = Image.new("RGB", (size, size), (0, 0, 0))
        canvas.paste(img, ((size - new_w) // 2, (size - new_h) // 2))
        img = canvas
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(img.size[1], img.size[0], 3)
    x = x.permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(3, 1, 1)
    return (x - mean) / std


def _load_hps_state_dict(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        state = load_file(path)
    else:
        # the HPS release is a torch zip of tensors: weights_only=True refuses anything else
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise ValueError(f"{path} has no 'state_dict' key: pass HPS_v2_compressed.pt or HPS_v2.1_compressed.pt")
        state = ckpt["state_dict"]
    if state and next(iter(state)).startswith("module."):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


class HPSv2Scorer:
    """Human Preference Score v2 / v2.1: open_clip ``ViT-H-14`` with the HPS checkpoint's weights.

    ``score`` returns the raw cosine (as ``hpsv2.score``); reports multiply by ``report_scale`` (100).
    """

    report_scale = 100.0

    def __init__(self, checkpoint: str | os.PathLike, model_name: str = "ViT-H-14",
                 device: str | torch.device = "cpu", batch_size: int = 32, expected_sha256: str | None = None):
        open_clip = _open_clip()
        path, self.sha256 = resolve_weights(checkpoint, "HPSv2", expected_sha256)
        model = open_clip.create_model(model_name, pretrained=None, device="cpu")
        missing, unexpected = model.load_state_dict(_load_hps_state_dict(str(path)), strict=False)
        if missing or unexpected:
            raise ValueError(f"HPS checkpoint {checkpoint} does not match open_clip {model_name}: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.model = model.to(device).eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        size = self.model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.name = "hpsv2"
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return _batched_cosine(self, images, list(prompts), lambda img: hps_preprocess(img, self.image_size))
