"""Rectified-flow teachers (SD3-style MMDiT): the VP disguise's maths, loading, one VSD step, the export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from wadi_core.models.flow import (add_flow_noise, eps_from_velocity, flow_alphas_cumprod, flow_from_vp,
                                flow_grid_sigmas, velocity_from_eps, vp_from_flow, x0_from_velocity)
from wadi_core.vsd.losses import add_noise, dmd2_gradient, vsd_gradient, x0_from_eps

PROMPTS = ["a red circle", "a small blue square on the left"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- the conversions (float64: "exact" means to rounding) -----------------------------------------------------
def test_flow_latent_is_a_vp_latent_with_the_flow_alphabar() -> None:
    x0, eps = torch.randn(5, 4, 3, 3, generator=_gen(0), dtype=torch.float64).unbind(0)[:2]
    x0, eps = x0.expand(5, -1, -1, -1), eps.expand(5, -1, -1, -1)
    sigma = torch.tensor([0.0, 0.1, 0.5, 0.93, 1.0], dtype=torch.float64)
    x_s = add_flow_noise(x0, eps, sigma)
    x_vp = vp_from_flow(x_s, sigma)
    torch.testing.assert_close(x_vp, add_noise(x0, eps, flow_alphas_cumprod(sigma)), rtol=0, atol=1e-12)
    torch.testing.assert_close(flow_from_vp(x_vp, sigma), x_s, rtol=0, atol=1e-12)
    assert flow_alphas_cumprod(sigma)[0] == 1 and flow_alphas_cumprod(sigma)[-1] == 0


def test_velocity_gives_the_true_eps_and_x0_and_inverts() -> None:
    x0, eps = torch.randn(2, 3, 4, 5, 5, generator=_gen(1), dtype=torch.float64).unbind(0)
    sigma = torch.tensor([0.05, 0.4, 0.999], dtype=torch.float64)
    x_s = add_flow_noise(x0, eps, sigma)
    v = eps - x0  # the rectified-flow target
    torch.testing.assert_close(eps_from_velocity(x_s, v, sigma), eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(x0_from_velocity(x_s, v, sigma), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(velocity_from_eps(x_s, eps, sigma), v, rtol=0, atol=1e-9)
    # At sigma = 1 the latent is the noise: eps = x_s whatever v, and x0 = z - v (the one-step generator).
    z = torch.randn(3, 4, 5, 5, generator=_gen(2), dtype=torch.float64)
    torch.testing.assert_close(eps_from_velocity(z, v, 1.0), z, rtol=0, atol=0)
    torch.testing.assert_close(x0_from_velocity(z, v, 1.0), z - v, rtol=0, atol=0)


def test_half_precision_velocity_is_converted_in_fp32() -> None:
    x_s = torch.randn(2, 4, 4, 4, generator=_gen(3))
    v = torch.randn(2, 4, 4, 4, generator=_gen(4)).to(torch.bfloat16)
    assert eps_from_velocity(x_s.to(torch.bfloat16), v, 0.3).dtype == torch.float32
    assert x0_from_velocity(x_s, v, torch.tensor([1.0, 0.5])).dtype == torch.float32


def test_grid_is_the_flow_schedulers_training_sigmas_with_shift() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    for shift in (1.0, 3.0):
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        grid = flow_grid_sigmas(1000, shift)
        torch.testing.assert_close(grid.float(), sched.sigmas.flip(0), rtol=0, atol=1e-6)
        assert grid[-1] == 1.0
    assert flow_grid_sigmas(1000, 3.0)[499] == pytest.approx(0.75, abs=1e-3)  # 3 * .5 / (1 + 2 * .5)
    from wadi_core.models.flow import flow_sigmas_of

    torch.testing.assert_close(flow_sigmas_of(sched), grid, rtol=0, atol=0)
    with pytest.raises(ValueError, match="use_dynamic_shifting=false"):
        flow_sigmas_of(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))


# -- a flow teacher built from a known VP eps model answers the VP interface exactly --------------------------
class _GaussianVP:
    """The exact eps of x0 ~ N(mu, s0^2): eps*(x_t) = sqrt(1-abar) (x_t - sqrt(abar) mu) / (abar s0^2 + 1 - abar)."""

    def __init__(self, mu: torch.Tensor, s0: float) -> None:
        self.mu, self.s0 = mu, s0

    def eps(self, x_vp: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        a = abar.view(-1, 1, 1, 1).to(x_vp.dtype)
        return (1 - a).sqrt() * (x_vp - a.sqrt() * self.mu) / (a * self.s0 ** 2 + 1 - a)


class _VelocityOfVP(nn.Module):
    """A flow denoiser (UNet call signature) whose velocity is the Gaussian VP model's, mapped: the teacher
    sees it at flow latents x_s and timestep sigma * 1000."""

    def __init__(self, vp: _GaussianVP) -> None:
        super().__init__()
        self.vp = vp
        self.w = nn.Parameter(torch.zeros(()))  # Teacher.device / dtype read a parameter

    def forward(self, x_s, timestep, encoder_hidden_states=None, return_dict=False):
        sigma = (timestep.to(torch.float64) / 1000).view(-1, 1, 1, 1)
        c = ((1 - sigma) ** 2 + sigma ** 2).sqrt()
        abar = flow_alphas_cumprod(sigma.view(-1))
        eps = self.vp.eps(x_s.double() / c, abar)
        x0 = (x_s.double() - sigma * eps) / (1 - sigma)
        return ((eps - x0).to(x_s.dtype),)


def _flow_teacher(vp: _GaussianVP, shift: float = 3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from wadi_core.models.teacher import Teacher

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    return Teacher(_VelocityOfVP(vp), vae=None, text_encoder=None, tokenizer=None, scheduler=sched, family="sd")


def test_flow_teacher_answers_the_vp_eps_and_the_losses_are_the_vp_losses() -> None:
    from wadi_core.models.teacher import Cond

    vp = _GaussianVP(mu=torch.full((1, 4, 4, 4), 0.3, dtype=torch.float64), s0=0.7)
    teacher = _flow_teacher(vp)
    assert teacher.prediction_type == "flow"
    abar = teacher.alphas_cumprod.double()
    torch.testing.assert_close(abar, flow_alphas_cumprod(flow_grid_sigmas(1000, 3.0)), rtol=0, atol=1e-7)
    t = torch.tensor([20, 300, 700, 980])
    x0 = torch.randn(4, 4, 4, 4, generator=_gen(5), dtype=torch.float64)
    x_t = add_noise(x0, torch.randn(4, 4, 4, 4, generator=_gen(6), dtype=torch.float64), abar[t])
    cond = Cond(torch.zeros(4, 1, 1))
    e_flow = teacher.predict_eps(x_t.float(), t, cond)
    e_vp = vp.eps(x_t, abar[t])
    assert e_flow.dtype == torch.float32
    torch.testing.assert_close(e_flow.double(), e_vp, rtol=0, atol=2e-6)

    # A fake score that is the same Gaussian with another mean: both gradients, in the flow's own
    # velocities, are the stated relations (docs/ARCHITECTURE.md, "Flow-matching teachers").
    fake = _flow_teacher(_GaussianVP(mu=torch.full((1, 4, 4, 4), -0.2, dtype=torch.float64), s0=0.7))
    e_fake = fake.predict_eps(x_t.float(), t, cond).double()
    sigma = flow_grid_sigmas(1000, 3.0)[t].view(-1, 1, 1, 1)
    x_s = flow_from_vp(x_t, sigma.view(-1))
    v_real, v_fake = velocity_from_eps(x_s, e_flow.double(), sigma.view(-1)), velocity_from_eps(x_s, e_fake, sigma.view(-1))
    abar64 = flow_alphas_cumprod(sigma.view(-1))  # the relations are exact algebra: float64 throughout
    g = vsd_gradient(e_flow.double(), e_fake, abar64)
    c2 = (1 - sigma) ** 2 + sigma ** 2
    torch.testing.assert_close(g, sigma ** 2 * (1 - sigma) / c2 * (v_real - v_fake), rtol=1e-9, atol=1e-12)
    # DMD2 in x0: x0_pred from eps in the VP disguise is the flow's x_s - s v.
    x_t = vp_from_flow(x_s, sigma.view(-1))
    torch.testing.assert_close(x0_from_eps(x_t, e_flow.double(), abar64), x0_from_velocity(x_s, v_real, sigma.view(-1)),
                               rtol=1e-9, atol=1e-9)
    g_dmd2 = dmd2_gradient(x0, x_t, e_flow.double(), e_fake, abar64)
    p_real, p_fake = x0 - (x_s - sigma * v_real), x0 - (x_s - sigma * v_fake)
    norm = p_real.abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(g_dmd2, (p_real - p_fake) / norm, rtol=1e-9, atol=1e-9)


# -- tiny SD3 ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory) -> Path:
    from wadi_core.models.tiny import build_tiny_sd3_pipeline

    out = tmp_path_factory.mktemp("sd3") / "teacher"
    build_tiny_sd3_pipeline(seed=0).save_pretrained(out, safe_serialization=True)
    return out


def _distiller(src: Path, **vsd):
    from wadi_core.models import load_teacher
    from wadi_core.vsd import AdapterSpec, VSDConfig, WaDiDistiller

    torch.manual_seed(0)
    d = WaDiDistiller(load_teacher(src), VSDConfig(student=AdapterSpec("lorad", 4), fake=AdapterSpec("lorad", 2),
                                                   **vsd))
    with torch.no_grad():  # LoRaD is the identity at init: give the adapters real angles
        for p in d.parameters("student") + d.parameters("fake"):
            p.add_(0.05 * torch.randn_like(p))
    return d


def test_tiny_sd3_loads_and_encodes_as_the_diffusers_pipeline(tiny_sd3) -> None:
    from diffusers import StableDiffusion3Pipeline

    from wadi_core.models import load_prompt_encoder, load_teacher

    teacher = load_teacher(tiny_sd3)
    assert (teacher.family, teacher.prediction_type, teacher.latent_shape) == ("sd3", "flow", (4, 8, 8))
    assert float(teacher.alphas_cumprod[-1]) == 0.0 and float(teacher.flow_sigmas[-1]) == 1.0
    cond = teacher.encode_prompts(PROMPTS)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
    assert cond.embeds.shape == (2, 77 + 256, 48) and cond.pooled.shape == (2, 32)
    # CLIP rows agree exactly; T5's batched fp32 attention differs between the two loads by float noise (~1e-5)
    torch.testing.assert_close(cond.embeds[:, :77], embeds[:, :77], rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.embeds[:, 77:], embeds[:, 77:], rtol=0, atol=3e-5)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=1e-6)
    # The Ray Data actors' encoder (T5 off the trainers) gives the same conditioning.
    off_trainer = load_prompt_encoder(tiny_sd3)(PROMPTS)
    torch.testing.assert_close(off_trainer.embeds, cond.embeds, rtol=0, atol=0)
    torch.testing.assert_close(off_trainer.pooled, cond.pooled, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pooled text embeddings"):
        from wadi_core.models.teacher import Cond

        teacher.predict_eps(torch.zeros(1, 4, 8, 8), 500, Cond(cond.embeds[:1]))


@pytest.mark.parametrize("loss", ["vsd", "dmd2"])
def test_tiny_sd3_vsd_step_trains_both_adapters(tiny_sd3, loss) -> None:
    from wadi_core.vsd import make_updaters, vsd_step

    d = _distiller(tiny_sd3, loss=loss)
    before = {r: [p.detach().clone() for p in d.parameters(r)] for r in ("student", "fake")}
    cond = d.teacher.encode_prompts(PROMPTS)
    metrics = vsd_step(d, cond, *make_updaters(d).values(), _gen(0))
    assert metrics["skipped_nonfinite"] == 0.0
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert metrics["g_abs_mean"] > 0 and metrics["score_gap"] > 0
    for role, params in before.items():
        assert any(not torch.equal(a, b) for a, b in zip(params, d.parameters(role))), role


def test_one_step_generator_is_z_minus_the_student_velocity_at_sigma_one(tiny_sd3) -> None:
    d = _distiller(tiny_sd3)
    cond = d.teacher.encode_prompts(PROMPTS)
    z = torch.randn(2, *d.teacher.latent_shape, generator=_gen(7))
    with torch.no_grad(), d.role("student"):
        v = d.denoiser(hidden_states=z, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled,
                       timestep=torch.full((2,), 1000.0), return_dict=False)[0]
        x0 = d.generate(z, cond)
    torch.testing.assert_close(x0, z - v, rtol=0, atol=1e-6)
    assert d.student_alphabar == 0.0
    from wadi_core.vsd import VSDConfig, WaDiDistiller

    with pytest.raises(ValueError, match="flow teacher needs vsd.student_alphabar=schedule or auto"):
        from wadi_core.models import load_teacher

        WaDiDistiller(load_teacher(tiny_sd3), VSDConfig(student_alphabar=0.0047))


def test_export_loads_in_the_stock_sd3_pipeline_and_reproduces_the_training_x0(tiny_sd3, tmp_path) -> None:
    from diffusers import StableDiffusion3Pipeline

    from wadi_core.adapters import AdaptedLinear
    from wadi_core.export import export_one_step_pipeline

    d = _distiller(tiny_sd3)
    out = export_one_step_pipeline(d, tmp_path / "export")
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    assert not any(isinstance(m, AdaptedLinear) for m in pipe.transformer.modules())
    assert pipe.scheduler.config.shift == d.teacher.scheduler.config.shift == 3.0
    pipe.scheduler.set_timesteps(1)
    assert pipe.scheduler.timesteps.tolist() == [1000.0] and pipe.scheduler.sigmas.tolist() == [1.0, 0.0]

    z = torch.randn(2, *d.teacher.latent_shape, generator=_gen(8))
    with torch.no_grad():
        latents = pipe(PROMPTS, num_inference_steps=1, guidance_scale=1.0, latents=z.clone(),
                       output_type="latent").images
        x0 = d.generate(z, d.teacher.encode_prompts(PROMPTS))
        images = pipe(PROMPTS, num_inference_steps=1, guidance_scale=1.0, latents=z.clone(), output_type="pt").images
        expected = d.sample(PROMPTS, z=z)
    torch.testing.assert_close(latents, x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(images.float(), expected, rtol=0, atol=2e-4)  # VAE shift and scale as the pipeline
    with torch.no_grad():  # and it is the student, not the teacher's own one-step sample
        v_teacher = d.teacher.predict_velocity(z, torch.full((2,), 1000.0), d.teacher.encode_prompts(PROMPTS))
    assert (latents - (z - v_teacher)).abs().max() > 100 * 1e-5


def test_export_of_a_teacher_trained_without_its_text_encoders_copies_all_three(tiny_sd3, tmp_path) -> None:
    from diffusers import StableDiffusion3Pipeline

    from wadi_core.adapters import adapter_state_dict
    from wadi_core.export import export_one_step_pipeline
    from wadi_core.models import load_teacher

    d = _distiller(tiny_sd3)
    teacher = load_teacher(tiny_sd3, text_encoder=False)
    assert teacher.text_encoder is None and teacher.tokenizer.t5 is not None
    out = export_one_step_pipeline(teacher, tmp_path / "export", cfg=d.cfg,
                                   student_state=adapter_state_dict(d.denoiser, "student"))
    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    assert pipe.text_encoder is not None and pipe.text_encoder_2 is not None and pipe.text_encoder_3 is not None
    z = torch.randn(1, *d.teacher.latent_shape, generator=_gen(9))
    with torch.no_grad():
        latents = pipe(PROMPTS[:1], num_inference_steps=1, guidance_scale=1.0, latents=z.clone(),
                       output_type="latent").images
        x0 = d.generate(z, d.teacher.encode_prompts(PROMPTS[:1]))
    torch.testing.assert_close(latents, x0, rtol=0, atol=1e-5)


# -- the published SD3-medium transformer, on the meta device ------------------------------------------------
def test_sd3_medium_dry_run_counts_and_layer_sets() -> None:
    from wadi_core.adapters import add_adapter, count_trainable
    from wadi_core.adapters.spec import PRESET_TARGETS
    from wadi_core.adapters.targets import resolve_targets
    from wadi_core.models import build_denoiser_on_meta, family_of_config
    from wadi_core.models.meta import DENOISER_CONFIGS

    config = DENOISER_CONFIGS["sd3-medium"]
    assert family_of_config(config) == "sd3" and PRESET_TARGETS["sd3"] == ("mmdit_student", "mmdit_fake")
    model = build_denoiser_on_meta("sd3-medium")
    assert type(model).__name__ == "SD3Transformer2DModel"
    # stabilityai/stable-diffusion-3-medium-diffusers: 24 joint blocks, 1536 wide, 2.03 B parameters
    assert (len(model.transformer_blocks), model.inner_dim) == (24, 1536)
    assert sum(p.numel() for p in model.parameters()) == 2_028_328_000
    student, fake = resolve_targets(model, "mmdit_student"), resolve_targets(model, "mmdit_fake")
    assert not any(n.startswith("time_text_embed.") for n in student)
    assert {"context_embedder", "norm_out.linear", "proj_out", "transformer_blocks.0.norm1.linear",
            "transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.to_add_out",
            "transformer_blocks.0.ff_context.net.2"} <= set(student)
    assert set(fake) < set(student) and all(n.startswith("transformer_blocks.") for n in fake)
    # 23 blocks x 14 Linears + the last (context_pre_only: no to_add_out, ff_context: 11) = 333
    assert (len(student), len(fake)) == (336, 333)
    with torch.device("meta"):
        add_adapter(model, "lorad", "student", 64, "mmdit_student")
        add_adapter(model, "lorad", "fake", 32, "mmdit_fake")
    assert count_trainable(model, "student") == 93_622_272
    assert count_trainable(model, "fake") == 46_546_944


def test_a_flow_unet_teacher_distils_and_its_export_samples_with_the_flow_sampler(tmp_path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from wadi_core.export import export_one_step_pipeline
    from wadi_core.models.tiny import save_tiny_pipeline
    from wadi_core.vsd import make_updaters, vsd_step

    src = save_tiny_pipeline(tmp_path / "teacher", "sd")
    FlowMatchEulerDiscreteScheduler(shift=1.0).save_pretrained(src / "scheduler")
    index = json.loads((src / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    (src / "model_index.json").write_text(json.dumps(index))
    d = _distiller(src)
    assert (d.teacher.family, d.teacher.prediction_type) == ("sd", "flow")
    metrics = vsd_step(d, d.teacher.encode_prompts(PROMPTS), *make_updaters(d).values(), _gen(0))
    assert metrics["skipped_nonfinite"] == 0.0 and metrics["g_abs_mean"] > 0
    out = export_one_step_pipeline(d, tmp_path / "export")
    assert "sample_flow" in json.loads((out / "wadi_export.json").read_text())["sampler"]
    from wadi_core.models import load_teacher
    from wadi_core.models.flow import sample_flow

    merged = load_teacher(out)
    assert merged.prediction_type == "flow"
    z = torch.randn(2, *d.teacher.latent_shape, generator=_gen(11))
    with torch.no_grad():
        expected = d.generate(z, d.teacher.encode_prompts(PROMPTS))
    torch.testing.assert_close(sample_flow(merged, PROMPTS, z, 1), expected, rtol=0, atol=1e-5)


def test_sd3_medium_recipe_dry_run_plan() -> None:
    from pipelines.config.job import load_config
    from pipelines.config.plan import build_plan

    cfg = load_config("sd3_medium")
    assert cfg.vsd.student_timestep == 999 and cfg.vsd.student_alphabar == "auto"  # sigma = 1: x0 = z - v
    assert (cfg.vsd.student.rank, cfg.vsd.fake.rank, cfg.data.text_encoding) == (64, 32, "actors")
    plan = build_plan(cfg)
    assert (plan.family, plan.base_params) == ("sd3", 2_028_328_000)
    assert plan.trainable == {"student": 93_622_272, "fake": 46_546_944}
    assert plan.layer_sets["student"].endswith("mmdit_student") and plan.layer_sets["fake"].endswith("mmdit_fake")


def test_flow_sampler_and_the_evaluation_generator_sample_as_the_stock_sd3_pipeline(tiny_sd3) -> None:
    from diffusers import StableDiffusion3Pipeline

    from pipelines.evaluate.generation import ImageGenerator, ModelSpec, prompt_seed
    from wadi_core.models import load_teacher
    from wadi_core.models.flow import sample_flow

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    teacher = load_teacher(tiny_sd3)
    z = torch.randn(2, 4, 8, 8, generator=_gen(10))
    for steps, guidance in ((1, 1.0), (4, 3.0)):
        with torch.no_grad():
            expected = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=z.clone(),
                            output_type="latent").images
        torch.testing.assert_close(sample_flow(teacher, PROMPTS, z, steps, guidance), expected, rtol=0, atol=1e-5)
    # The evaluation's generator (FID / precision of teacher and student) takes the same route.
    gen = ImageGenerator(ModelSpec(uri=str(tiny_sd3), steps=4, guidance=3.0), seed=0, device="cpu")
    keys = ["k0", "k1"]
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(prompt_seed(0, k))) for k in keys])
    with torch.no_grad():
        ref = pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, latents=noise, output_type="pt").images
    got = torch.from_numpy(gen.generate(PROMPTS, keys)).permute(0, 3, 1, 2).float() / 255
    assert (got - ref.float()).abs().max() <= 1 / 255 + 1e-6
