"""The merged one-step export loads with from_pretrained and reproduces the distiller's sample."""

from __future__ import annotations

import pytest
import torch

from wadi_core.adapters import load_adapter_file
from wadi_core.export import export_one_step_pipeline
from wadi_core.models import load_teacher
from wadi_core.models.tiny import save_tiny_pipeline
from wadi_core.vsd import AdapterSpec, VSDConfig, WaDiDistiller

PROMPTS = ["a red circle", "a small blue square on the left"]


def _trained_looking_distiller(src) -> WaDiDistiller:
    torch.manual_seed(0)
    d = WaDiDistiller(load_teacher(src), VSDConfig(student=AdapterSpec("lorad", 8), fake=AdapterSpec("lorad", 4)))
    with torch.no_grad():  # LoRaD is the identity at init: give the student real angles
        for p in d.parameters("student") + d.parameters("fake"):
            p.add_(0.05 * torch.randn_like(p))
    return d


@pytest.mark.parametrize("family", ["sd", "pixart"])
def test_export_loads_with_from_pretrained_and_samples_in_one_step(tmp_path, family):
    from diffusers import DiffusionPipeline

    from wadi_core.adapters import AdaptedLinear, adapter_state_dict

    d = _trained_looking_distiller(save_tiny_pipeline(tmp_path / "teacher", family))
    base = {k: v.clone() for k, v in d.denoiser.state_dict().items()}
    out = export_one_step_pipeline(d, tmp_path / "export")

    pipe = DiffusionPipeline.from_pretrained(out)
    den = pipe.unet if family == "sd" else pipe.transformer
    assert not any(isinstance(m, AdaptedLinear) for m in den.modules())
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    pipe.scheduler.set_timesteps(1)
    assert pipe.scheduler.timesteps.tolist() == [999]
    # The official a = 0.0047, for PixArt too, whose own schedule ends at alphabar_999 = 4.0e-5:
    # a plain DDIM step at t=999 would not be the student's generator there.
    teacher_a999 = float(d.teacher.alphas_cumprod[999])
    assert teacher_a999 == pytest.approx(0.00466 if family == "sd" else 4.04e-5, rel=0.01)
    assert float(pipe.scheduler.alphas_cumprod[999]) == pytest.approx(0.0047, rel=1e-6)
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod[:999], d.teacher.alphas_cumprod[:999])

    z = torch.randn(2, *d.teacher.latent_shape, generator=torch.Generator().manual_seed(0))
    kwargs = dict(num_inference_steps=1, guidance_scale=1.0, latents=z.clone(), output_type="pt",
                  height=32, width=32)
    if family == "pixart":
        kwargs["use_resolution_binning"] = False
    with torch.no_grad():
        images = pipe(PROMPTS, **kwargs).images
        expected = d.sample(PROMPTS, z=z)
    assert images.shape == expected.shape == (2, 3, 32, 32)
    torch.testing.assert_close(images.float(), expected, rtol=0, atol=2e-4)
    with torch.no_grad():  # and it is the student, not the teacher's own one-step sample
        from wadi_core.vsd import x0_from_eps

        t = torch.full((2,), 999)
        e_teacher = d.eps("teacher", z, t, d.teacher.encode_prompts(PROMPTS))
        teacher_images = d.teacher.decode(x0_from_eps(z, e_teacher, d.abar(t)))
    assert (images.float() - teacher_images).abs().max() > 10 * 2e-4  # 10x the agreement tolerance

    # The training model is untouched and the adapters are saved for re-use.
    assert all(torch.equal(v, d.denoiser.state_dict()[k]) for k, v in base.items())
    state, spec = load_adapter_file(out / "adapters" / "student.safetensors")
    assert spec.kind == "lorad" and spec.rank == 8
    assert all(torch.equal(state[k], v) for k, v in adapter_state_dict(d.denoiser, "student").items())
    assert (out / "adapters" / "fake.safetensors").exists() and (out / "wadi_export.json").exists()
    # One adapter file format: the generic loader adds the export's adapter onto a fresh teacher.
    from wadi_core.adapters import load_adapter

    fresh = load_teacher(tmp_path / "teacher").denoiser
    load_adapter(fresh, "student", out / "adapters" / "student.safetensors")
    assert all(torch.equal(adapter_state_dict(fresh, "student")[k], v) for k, v in state.items())


def test_export_from_teacher_and_adapter_state(tmp_path):
    from wadi_core.adapters import adapter_state_dict

    src = save_tiny_pipeline(tmp_path / "teacher", "sd")
    d = _trained_looking_distiller(src)
    state = adapter_state_dict(d.denoiser, "student")
    out = export_one_step_pipeline(load_teacher(src), tmp_path / "export", cfg=d.cfg, student_state=state)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out)
    z = torch.randn(1, *d.teacher.latent_shape)
    with torch.no_grad():
        img = pipe(PROMPTS[:1], num_inference_steps=1, guidance_scale=1.0, latents=z.clone(), output_type="pt").images
    torch.testing.assert_close(img.float(), d.sample(PROMPTS[:1], z=z), rtol=0, atol=2e-4)
    with pytest.raises(ValueError, match="cfg= and student_state="):
        export_one_step_pipeline(load_teacher(src), tmp_path / "x")


@pytest.mark.parametrize("family", ["sd", "pixart"])
def test_export_x0_is_the_training_generator_for_each_alphabar_choice(tmp_path, family):
    """The exported 1-step latent equals the training-time x0 = (z - sqrt(1-a) eps_hat) / sqrt(a),
    for the official a = 0.0047 and for the schedule's own alphabar_999."""
    from diffusers import DiffusionPipeline

    src = save_tiny_pipeline(tmp_path / "teacher", family)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for choice in (0.0047, "schedule"):
        torch.manual_seed(0)
        cfg = VSDConfig(student=AdapterSpec("lorad", 8), fake=AdapterSpec("lorad", 4), student_alphabar=choice)
        d = WaDiDistiller(load_teacher(src), cfg)
        with torch.no_grad():
            for p in d.parameters("student"):
                p.add_(0.05 * torch.randn_like(p))
            cond = d.teacher.encode_prompts(PROMPTS)
            x0_train = d.generate(z, cond)
            eps_hat = d.eps("student", z, torch.full((2,), 999), cond)
        a = 0.0047 if choice == 0.0047 else float(d.teacher.alphas_cumprod[999])
        assert d.student_alphabar == pytest.approx(a, rel=1e-7)
        torch.testing.assert_close(x0_train, (z - (1 - a) ** 0.5 * eps_hat) / a ** 0.5, rtol=1e-5, atol=1e-5)
        out = export_one_step_pipeline(d, tmp_path / f"export_{choice}")
        pipe = DiffusionPipeline.from_pretrained(out)
        kwargs = dict(num_inference_steps=1, guidance_scale=1.0, latents=z.clone(), output_type="latent")
        if family == "pixart":
            kwargs["use_resolution_binning"] = False
        with torch.no_grad():
            latents = pipe(PROMPTS, **kwargs).images
        torch.testing.assert_close(latents.float(), x0_train, rtol=1e-4, atol=1e-4)


def test_v_prediction_teacher_needs_the_schedule_alphabar(tmp_path):
    from diffusers import DDPMScheduler

    src = save_tiny_pipeline(tmp_path / "teacher", "sd")
    teacher = load_teacher(src)
    teacher.scheduler = DDPMScheduler.from_config(teacher.scheduler.config, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="student_alphabar=schedule"):  # the official constant cannot be exported
        WaDiDistiller(teacher, VSDConfig(student=AdapterSpec("lorad", 4), fake=AdapterSpec("lorad", 4),
                                         student_alphabar=0.0047))
    # The default ("auto") picks the schedule's alphabar for a v teacher, whose export (a
    # v-prediction DDIM) reproduces the training x0.
    torch.manual_seed(0)
    d = WaDiDistiller(teacher, VSDConfig(student=AdapterSpec("lorad", 4), fake=AdapterSpec("lorad", 4)))
    assert d.cfg.student_alphabar == "auto" and d.student_alphabar == pytest.approx(float(d.teacher.alphas_cumprod[999]))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in d.parameters("student"):
            p.add_(0.05 * torch.randn_like(p))
        x0_train = d.generate(z, d.teacher.encode_prompts(PROMPTS))
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(export_one_step_pipeline(d, tmp_path / "export"))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    with torch.no_grad():
        latents = pipe(PROMPTS, num_inference_steps=1, guidance_scale=1.0, latents=z.clone(), output_type="latent").images
    torch.testing.assert_close(latents.float(), x0_train, rtol=1e-4, atol=1e-4)
