"""The shipped embedded teacher: a complete SD pipeline that loads locally and from s3://, and samples.

Also: the pretraining job resumes exactly (tiny config).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from wadi_core.domain.teacher import TeacherArch, folder_size_mb

TEACHER = __import__("pathlib").Path(__file__).resolve().parents[1] / "wadi_core" / "assets" / "embedded_teacher"


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(TEACHER))


def test_shipped_folder_is_small_and_safetensors_only():
    files = [p for p in TEACHER.rglob("*") if p.is_file()]
    assert folder_size_mb(TEACHER) <= 20.0
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert {p.parent.name for p in files if p.suffix == ".safetensors"} == {"unet", "vae", "text_encoder"}
    index = json.loads((TEACHER / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["tokenizer"] == ["transformers", "CLIPTokenizer"]


def test_from_pretrained_and_two_step_sample(pipe):
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae.config.scaling_factor != 0.18215  # measured from the latents' std, not SD's value
    sched = pipe.scheduler.config
    assert (sched.beta_start, sched.beta_end, sched.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert sched.prediction_type == "v_prediction"  # its one-step x0 does not amplify errors (docs/history/QUALITY.md)
    pipe.scheduler.set_timesteps(1)
    assert pipe.scheduler.timesteps.tolist() == [999]  # trailing spacing: one step starts from pure noise
    out = pipe(["a large red circle on the left", "a small blue square at the top"], num_inference_steps=2,
               guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == (2, 3, 32, 32)
    assert torch.isfinite(out.images).all() and out.images.min() >= 0 and out.images.max() <= 1


def _check_teacher(teacher):
    assert teacher.family == "sd" and tuple(teacher.latent_shape) == (4, 8, 8)
    cond = teacher.encode_prompts(["a small green triangle at the bottom"])
    x = torch.randn(1, 4, 8, 8)
    eps = teacher.predict_eps(x, torch.tensor([500]), cond)
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    img = teacher.decode(x)
    assert img.shape == (1, 3, 32, 32)


def test_load_teacher_local_and_s3(s3_bucket, tmp_path):
    from wadi_core.models import load_teacher
    from wadi_core.storage import upload_dir

    _check_teacher(load_teacher(str(TEACHER)))
    uri = f"s3://{s3_bucket}/teachers/embedded"
    upload_dir(TEACHER, uri)
    teacher = load_teacher(uri, cache_dir=tmp_path / "cache")
    _check_teacher(teacher)
    local = load_teacher(str(TEACHER))
    for (name, a), (_, b) in zip(teacher.denoiser.state_dict().items(), local.denoiser.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_pretraining_resumes_exactly(tmp_path, workers):
    from wadi_core.domain.pretrain import PretrainConfig, pretrain_teacher

    arch = TeacherArch(vae_channels=(16, 16, 16), text_hidden=32, text_heads=2, unet_channels=(16, 32),
                       unet_heads=2, max_tokens=16)
    cfg = PretrainConfig(num_images=64, vae_steps=4, vae_decoder_steps=2, vae_batch=4, denoiser_steps=6,
                         denoiser_batch=8, warmup_steps=2, checkpoint_every=2, num_threads=1, arch=arch,
                         denoiser_workers=workers)
    full = pretrain_teacher(cfg, tmp_path / "a", tmp_path / "state_a", progress=False)
    part = pretrain_teacher(cfg, tmp_path / "b", tmp_path / "state_b", progress=False, stop_after_steps=7)
    assert part == {"stopped": 1.0} and not (tmp_path / "b").exists()
    assert json.loads((tmp_path / "state_b/state.json").read_text())["meta"]["phase"] == "denoiser"
    resumed = pretrain_teacher(cfg, tmp_path / "b", tmp_path / "state_b", progress=False)
    assert resumed["scaling_factor"] == full["scaling_factor"]
    from safetensors.torch import load_file

    for part_name in ("unet", "vae", "text_encoder"):
        (fa,) = (tmp_path / "a" / part_name).glob("*.safetensors")
        (fb,) = (tmp_path / "b" / part_name).glob("*.safetensors")
        wa, wb = load_file(str(fa)), load_file(str(fb))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{part_name}.{k} differs after resume"
    # a state folder of another architecture is refused with a clear message, not a shape error
    other = dataclasses.replace(cfg, arch=dataclasses.replace(arch, unet_channels=(16, 32, 32)))
    with pytest.raises(ValueError, match="another architecture"):
        pretrain_teacher(other, tmp_path / "c", tmp_path / "state_b", progress=False)


@pytest.mark.slow
def test_denoiser_steps_can_be_shortened_while_running(tmp_path):
    from wadi_core.domain.pretrain import PretrainConfig, pretrain_teacher

    arch = TeacherArch(vae_channels=(16, 16, 16), text_hidden=32, text_heads=2, unet_channels=(16, 32),
                       unet_heads=2, max_tokens=16)
    cfg = PretrainConfig(num_images=32, vae_steps=2, vae_decoder_steps=0, vae_batch=4, denoiser_steps=50,
                         denoiser_batch=4, warmup_steps=2, checkpoint_every=2, num_threads=1, arch=arch)
    (tmp_path / "state.steps").write_text("4\n")
    pretrain_teacher(cfg, tmp_path / "out", tmp_path / "state", progress=False)
    assert (tmp_path / "out" / "model_index.json").exists()
    from safetensors.torch import load_file

    # AdamW's step count in the final state: the phase ended at 4 steps instead of 50.
    assert float(load_file(str(tmp_path / "state" / "optimizer.safetensors"))["0.step"]) == 4
    assert json.loads((tmp_path / "state" / "state.json").read_text())["meta"]["phase"] == "done"


@pytest.mark.slow
def test_fine_tune_a_teacher_into_v_prediction(tmp_path):
    """init_from skips the VAE phases and starts the denoiser from a saved teacher; the saved
    pipeline's sampler knows it predicts v, and load_teacher turns that v into eps."""
    from safetensors.torch import load_file

    from wadi_core.domain.pretrain import PretrainConfig, pretrain_teacher
    from wadi_core.models import load_teacher

    arch = TeacherArch(vae_channels=(16, 16, 16), text_hidden=32, text_heads=2, unet_channels=(16, 32),
                       unet_heads=2, max_tokens=16)
    base = PretrainConfig(num_images=32, vae_steps=2, vae_decoder_steps=0, vae_batch=4, denoiser_steps=2,
                          denoiser_batch=4, warmup_steps=1, checkpoint_every=2, num_threads=1, arch=arch,
                          denoiser_workers=1)
    eps_summary = pretrain_teacher(base, tmp_path / "eps", tmp_path / "state_eps", progress=False)
    with pytest.raises(ValueError, match="prediction_type"):
        dataclasses.replace(base, prediction_type="sample")
    tuned = dataclasses.replace(base, init_from=str(tmp_path / "eps"), prediction_type="v_prediction", denoiser_steps=3)
    v_summary = pretrain_teacher(tuned, tmp_path / "v", tmp_path / "state_v", progress=False)
    assert v_summary["scaling_factor"] == eps_summary["scaling_factor"]

    def weights(folder, part):
        (f,) = (tmp_path / folder / part).glob("*.safetensors")
        return load_file(str(f))

    vae_eps, vae_v = weights("eps", "vae"), weights("v", "vae")
    assert all(torch.equal(vae_eps[k], vae_v[k]) for k in vae_eps)  # no VAE phase ran
    unet_eps, unet_v = weights("eps", "unet"), weights("v", "unet")
    assert any(not torch.equal(unet_eps[k], unet_v[k]) for k in unet_eps)  # the denoiser trained on
    # AdamW counted only the fine-tuning steps: training started from the saved weights, not step 0 of a new run
    assert float(load_file(str(tmp_path / "state_v" / "optimizer.safetensors"))["0.step"]) == 3
    sched = json.loads((tmp_path / "v" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    teacher = load_teacher(str(tmp_path / "v"))
    assert teacher.prediction_type == "v_prediction"
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 400])
    cond = teacher.encode_prompts(["a small green triangle at the bottom"] * 2)
    v = teacher.denoiser(x, t, encoder_hidden_states=cond.embeds).sample
    abar = teacher.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(teacher.predict_eps(x, t, cond), abar.sqrt() * v + (1 - abar).sqrt() * x)
