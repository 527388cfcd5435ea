"""load_teacher over SD-family and PixArt-alpha diffusers directories (local, s3, embedded)."""

from __future__ import annotations

import json

import pytest
import torch

from wadi_core import storage
from wadi_core.models import (EMBEDDED_TEACHER, Cond, build_denoiser_on_meta, load_teacher,
                              resolve_teacher_dir)
from wadi_core.models.tiny import save_tiny_pipeline


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"), "sd", seed=0)


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_pixart"), "pixart", seed=0)


def test_sd_teacher_facts_come_from_the_checkpoint(sd_dir):
    teacher = load_teacher(sd_dir)
    assert teacher.family == "sd"
    unet_cfg = json.loads((sd_dir / "unet" / "config.json").read_text())
    assert teacher.latent_shape == (unet_cfg["in_channels"], unet_cfg["sample_size"], unet_cfg["sample_size"])
    vae_cfg = json.loads((sd_dir / "vae" / "config.json").read_text())
    assert teacher.vae_scaling_factor == vae_cfg["scaling_factor"]
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(teacher.alphas_cumprod, torch.cumprod(1 - betas, 0).float(), rtol=1e-5, atol=1e-7)
    assert not any(p.requires_grad for p in teacher.denoiser.parameters())


def test_sd_teacher_encodes_77_clip_tokens_and_predicts_eps(sd_dir):
    teacher = load_teacher(sd_dir)
    cond = teacher.encode_prompts(["a red circle", "a small blue square on the left"])
    assert cond.embeds.shape == (2, 77, teacher.text_encoder.config.hidden_size) and cond.mask is None
    null = teacher.null_cond(3)
    torch.testing.assert_close(null.embeds[2], teacher.encode_prompts([""]).embeds[0])
    x = torch.randn(2, *teacher.latent_shape)
    with torch.no_grad():
        eps = teacher.predict_eps(x, torch.tensor([999, 10]), cond)
        direct = teacher.denoiser(x, torch.tensor([999, 10]), encoder_hidden_states=cond.embeds).sample
        images = teacher.decode(x)
    torch.testing.assert_close(eps, direct)
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1


def test_pixart_teacher_uses_t5_mask_and_takes_eps_from_learned_sigma_output(pixart_dir):
    teacher = load_teacher(pixart_dir)
    assert teacher.family == "pixart" and teacher.latent_shape == (4, 8, 8)
    cond = teacher.encode_prompts(["a red circle", "a small blue square on the left side"])
    assert cond.mask is not None and cond.mask.shape == cond.embeds.shape[:2]
    assert cond.mask[0].sum() < cond.mask[1].sum()  # shorter caption, fewer valid tokens
    x = torch.randn(2, *teacher.latent_shape)
    t = torch.tensor([500, 3])
    with torch.no_grad():
        eps = teacher.predict_eps(x, t, cond)
        full = teacher.denoiser(x, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask,
                                timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert full.shape[1] == 8 and eps.shape == x.shape
    torch.testing.assert_close(eps, full[:, :4])
    null = teacher.null_cond(2)
    mixed = cond.where(torch.tensor([True, False]), null)
    torch.testing.assert_close(mixed.mask[0], null.mask[0])
    torch.testing.assert_close(mixed.embeds[1], cond.embeds[1])
    assert Cond.cat([cond, null]).mask.shape[0] == 4


def test_v_prediction_is_converted_to_eps(sd_dir, tmp_path):
    import shutil

    vdir = tmp_path / "v"
    shutil.copytree(sd_dir, vdir)
    cfg_file = vdir / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["prediction_type"] = "v_prediction"
    cfg_file.write_text(json.dumps(cfg))
    teacher = load_teacher(vdir)
    cond = teacher.encode_prompts(["a red circle"])
    x, t = torch.randn(1, *teacher.latent_shape), torch.tensor([300])
    with torch.no_grad():
        v = teacher.denoiser(x, t, encoder_hidden_states=cond.embeds).sample
        eps = teacher.predict_eps(x, t, cond)
    a = teacher.alphas_cumprod[300]
    torch.testing.assert_close(eps, a.sqrt() * v + (1 - a).sqrt() * x)


def test_teacher_loads_from_s3_prefix(sd_dir, s3_bucket, tmp_path):
    storage.upload_dir(sd_dir, f"s3://{s3_bucket}/teachers/tiny")
    teacher = load_teacher(f"s3://{s3_bucket}/teachers/tiny", cache_dir=tmp_path / "cache")
    local = load_teacher(sd_dir)
    for (k, a), (_, b) in zip(teacher.denoiser.state_dict().items(), local.denoiser.state_dict().items()):
        assert torch.equal(a, b), k


def test_unknown_sources_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_teacher_dir("some-org/some-model")
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline"):
        load_teacher(tmp_path)


def test_embedded_teacher_constant_and_loading():
    assert EMBEDDED_TEACHER.name == "embedded_teacher" and EMBEDDED_TEACHER.parent.name == "assets"
    if not (EMBEDDED_TEACHER / "model_index.json").exists():
        pytest.skip("embedded teacher not trained yet")
    teacher = load_teacher("embedded")
    assert teacher.family == "sd" and len(teacher.latent_shape) == 3


def test_meta_denoiser_builds_without_memory():
    from wadi_core.adapters import add_adapter, count_trainable

    unet = build_denoiser_on_meta("sd15")
    assert all(p.device.type == "meta" for p in unet.parameters())
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD1.5's UNet
    add_adapter(unet, "lorad", "student", 256, "unet_student")
    assert round(count_trainable(unet, "student") / 1e6, 2) == 83.80
