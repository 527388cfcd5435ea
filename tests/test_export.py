"""The merged one-step export loads with from_pretrained and reproduces the distiller's sample."""

from __future__ import annotations

import pytest
import torch

from wadi_core.export import export_one_step_pipeline, load_adapter_file
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
