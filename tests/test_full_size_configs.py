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

from full_size_models import (ARCHS, FAMILIES, RECIPES, REAL_DENOISER_PARAMS, TEXT_ENCODERS,  # noqa: E402
                              component_configs, denoiser_on_meta, write_teacher)


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


def _encoder_on_meta(config: dict) -> torch.nn.Module:
    import transformers

    te = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        if te["model_type"] == "t5":
            return transformers.T5EncoderModel(transformers.T5Config(**te))
        projected = te["architectures"] == ["CLIPTextModelWithProjection"]
        cls = transformers.CLIPTextModelWithProjection if projected else transformers.CLIPTextModel
        return cls(transformers.CLIPTextConfig(**te))


T5_XXL_STAND_IN = 517_494_784  # T5-v1.1-XXL's width, 2 of its 24 layers (stated stand-in)


@pytest.mark.parametrize("arch,text_params,width,max_len,vae_params", [
    ("sd15", [123_060_480], 768, 77, 83_653_863),     # CLIP ViT-L/14 text tower; SD's KL-f8 autoencoder
    ("sd21", [340_387_840], 1024, 77, 83_653_863),    # OpenCLIP ViT-H/14 text tower, 23 of 24 layers (penultimate)
    ("pixart", [T5_XXL_STAND_IN], 4096, 120, 83_653_863),
    # CLIP ViT-L/14 (123 M) and OpenCLIP bigG/14 with projection (695 M); 768 + 1280 = 2048 token width
    ("sdxl", [123_060_480, 694_659_840], 2048, 77, 83_653_863),
    # CLIP-L and CLIP-G with projection, T5 stand-in; 16-channel KL-f8 without quant convs
    ("sd3", [123_650_304, 694_659_840, T5_XXL_STAND_IN], 4096, 77, 83_819_683),
])
def test_text_encoder_and_vae_have_real_shapes(arch: str, text_params: list[int], width: int, max_len: int,
                                               vae_params: int) -> None:
    from diffusers import AutoencoderKL

    cfg = component_configs(arch)
    assert [_count(_encoder_on_meta(cfg[enc])) for enc in TEXT_ENCODERS[arch]] == text_params
    with torch.device("meta"):
        vae = AutoencoderKL.from_config({k: v for k, v in cfg["vae"].items() if not k.startswith("_")})
    assert _count(vae) == vae_params
    den = cfg["denoiser"]
    assert width in (den.get("cross_attention_dim"), den.get("caption_channels"), den.get("joint_attention_dim"))
    assert cfg["tokenizer"]["model_max_length"] == max_len


def test_t5_stand_in_is_t5_xxl_with_fewer_layers() -> None:
    """PixArt's and SD3's T5: with its 24 layers back, the stand-in is the published T5-v1.1-XXL encoder."""
    for arch in ("pixart", "sd3"):
        t5 = component_configs(arch)[TEXT_ENCODERS[arch][-1]]
        assert t5["num_layers"] == 2
        assert _count(_encoder_on_meta({**t5, "num_layers": 24})) == 4_762_310_656


@pytest.mark.parametrize("arch", ["sdxl", "sd3"])
def test_shrunken_configs_stay_consistent(arch: str) -> None:
    """``--scale`` keeps the widths that cross components equal (text -> denoiser), or loading fails later."""
    cfg = component_configs(arch, scale=0.1)
    den = cfg["denoiser"]
    if arch == "sdxl":
        assert den["cross_attention_dim"] == cfg["text_encoder"]["hidden_size"] + cfg["text_encoder_2"]["hidden_size"]
        assert den["projection_class_embeddings_input_dim"] == 6 * 256 + cfg["text_encoder_2"]["projection_dim"]
    else:
        assert den["joint_attention_dim"] == cfg["text_encoder_3"]["d_model"]
        assert den["pooled_projection_dim"] == (cfg["text_encoder"]["projection_dim"]
                                                + cfg["text_encoder_2"]["projection_dim"])
    assert _count(_encoder_on_meta(cfg["text_encoder"])) < 10_000_000


@pytest.mark.parametrize("arch", ARCHS)
def test_shrunken_teacher_loads_through_the_pipeline(arch: str, tmp_path: Path) -> None:
    from wadi_core.models import load_teacher

    out = write_teacher(arch, tmp_path / arch, scale=0.05, latent=8)
    teacher = load_teacher(out)
    assert teacher.family == FAMILIES[arch]
    assert teacher.max_text_length == {"pixart": 120, "sd3": 256}.get(arch, 77)  # SD3: the T5 part (256)
    cond = teacher.encode_prompts(["a lighthouse at dawn"])
    joint = 77 + 256 if arch == "sd3" else teacher.max_text_length  # SD3: CLIP's 77 tokens, then T5's
    assert cond.embeds.shape[:2] == (1, joint)
    if arch in ("sdxl", "sd3"):  # pooled text conditions these denoisers
        assert cond.pooled is not None and cond.pooled.shape[0] == 1
    if arch != "pixart":  # CLIP's real vocabulary size and special-token ids
        clip = teacher.tokenizer if FAMILIES[arch] == "sd" else (
            teacher.tokenizer.tokenizer_2 if arch == "sdxl" else teacher.tokenizer.clip_g)
        assert len(clip) == 49408 and clip.eos_token_id == 49407
    x = torch.randn(1, *teacher.latent_shape)
    assert teacher.predict_eps(x, 999, cond).shape == x.shape


def test_depth_cuts_only_the_deep_stack() -> None:
    """``--depth``: the rehearsal's stand-in for a denoiser 24 GiB cannot hold twice; widths stay real."""
    real, cut = component_configs("sdxl")["denoiser"], component_configs("sdxl", depth=2)["denoiser"]
    assert cut["transformer_layers_per_block"] == [1, 2, 2]
    assert {k: v for k, v in cut.items() if k != "transformer_layers_per_block"} == \
        {k: v for k, v in real.items() if k != "transformer_layers_per_block"}
    sd3 = component_configs("sd3", depth=12)
    assert sd3["denoiser"]["num_layers"] == 12 and sd3["denoiser"]["caption_projection_dim"] == 1536
    assert sd3["text_encoder_2"] == component_configs("sd3")["text_encoder_2"]  # text side untouched
    with pytest.raises(ValueError, match="use --scale"):
        component_configs("sd15", depth=2)


def test_rehearsal_overrides_put_the_text_encoders_of_sdxl_and_sd3_in_cpu_actors(tmp_path: Path) -> None:
    """SDXL's and SD3's recipes encode text in Ray Data actors: on CPU those get no GPU; ``--set`` comes last."""
    from full_size import _overrides

    for arch in ("sdxl", "sd3"):
        ov = _overrides(arch, 2, tmp_path / "t", tmp_path / "lake", tmp_path, "no", 3, ["data.encoder_dtype=float32"])
        assert "data.encoder_gpus_per_actor=0" in ov and "train.num_workers=2" in ov
        assert ov[-1] == "data.encoder_dtype=float32"
    with pytest.raises(SystemExit, match="write key=value"):
        _overrides("sdxl", 2, tmp_path, tmp_path, tmp_path, "no", 3, ["vsd.student.rank"])
