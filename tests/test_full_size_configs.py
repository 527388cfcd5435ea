"""The full-size rehearsal's architectures (``benchmarks/configs``) are the real ones.

Parameter counts of the real-size denoisers are computed on the meta device (no memory) and
compared with the published checkpoints; the recipe each rehearses names the same architecture;
a shrunken build of each writes a diffusers folder that the pipeline's own loader reads back
with the real tokenizer lengths and component classes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from full_size_models import (ARCHS, RECIPES, REAL_DENOISER_PARAMS, component_configs,  # noqa: E402
                              denoiser_on_meta, write_teacher)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_real_size_denoiser_matches_the_published_checkpoint(arch: str) -> None:
    from wadi_core.models import build_denoiser_on_meta

    from pipelines.config.job import load_config

    assert _count(denoiser_on_meta(arch)) == REAL_DENOISER_PARAMS[arch]
    # The recipe's own architecture (what --dry-run plans with) is the same network.
    recipe_arch = load_config(RECIPES[arch]).architecture
    assert _count(build_denoiser_on_meta(recipe_arch)) == REAL_DENOISER_PARAMS[arch]


@pytest.mark.parametrize("arch,text_params,width,max_len", [
    ("sd15", 123_060_480, 768, 77),     # CLIP ViT-L/14 text tower
    ("sd21", 340_387_840, 1024, 77),    # OpenCLIP ViT-H/14 text tower, 23 of 24 layers (penultimate)
    ("pixart", 517_494_784, 4096, 120),  # T5-XXL width, 2 of 24 layers (stated stand-in)
])
def test_text_encoder_and_vae_have_real_shapes(arch: str, text_params: int, width: int, max_len: int) -> None:
    import transformers
    from diffusers import AutoencoderKL

    cfg = component_configs(arch)
    te = {k: v for k, v in cfg["text_encoder"].items() if not k.startswith("_")}
    with torch.device("meta"):
        if arch == "pixart":
            encoder = transformers.T5EncoderModel(transformers.T5Config(**te))
        else:
            encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**te))
        vae = AutoencoderKL.from_config({k: v for k, v in cfg["vae"].items() if not k.startswith("_")})
    assert _count(encoder) == text_params
    assert _count(vae) == 83_653_863  # SD's KL-f8 autoencoder (also PixArt's)
    den = cfg["denoiser"]
    assert den.get("cross_attention_dim", 0) == width or den.get("caption_channels") == width
    assert cfg["tokenizer"]["model_max_length"] == max_len


@pytest.mark.parametrize("arch", ARCHS)
def test_shrunken_teacher_loads_through_the_pipeline(arch: str, tmp_path: Path) -> None:
    from wadi_core.models import load_teacher

    out = write_teacher(arch, tmp_path / arch, scale=0.05, latent=8)
    teacher = load_teacher(out)
    assert teacher.family == ("pixart" if arch == "pixart" else "sd")
    assert teacher.max_text_length == (120 if arch == "pixart" else 77)
    cond = teacher.encode_prompts(["a lighthouse at dawn"])
    assert cond.embeds.shape[:2] == (1, teacher.max_text_length)
    if arch != "pixart":  # CLIP's real vocabulary size and special-token ids
        assert len(teacher.tokenizer) == 49408 and teacher.tokenizer.eos_token_id == 49407
    x = torch.randn(1, *teacher.latent_shape)
    assert teacher.predict_eps(x, 999, cond).shape == x.shape
