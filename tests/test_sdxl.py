"""SDXL teachers: loading, two-encoder text encoding with pooled embeddings and time ids, a VSD step,
the one-step exports (diffusers folder and single file), the text-encoder actors, and the dry-run
counts on the published architecture. Oracles: diffusers' own StableDiffusionXLPipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wadi_core.models import load_teacher
from wadi_core.models.tiny import save_tiny_pipeline
from wadi_core.vsd import AdapterSpec, VSDConfig, WaDiDistiller, make_updaters, vsd_step

PROMPTS = ["a red circle", "a small blue square on the left", "", "a green triangle"]


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("sdxl") / "teacher", "sdxl")


def _distiller(src: Path, **overrides) -> WaDiDistiller:
    torch.manual_seed(0)
    cfg = VSDConfig(**{"student": AdapterSpec("lorad", 8), "fake": AdapterSpec("lorad", 4), **overrides})
    return WaDiDistiller(load_teacher(src), cfg)


def _trained_looking(d: WaDiDistiller) -> WaDiDistiller:
    with torch.no_grad():  # LoRaD is the identity at init: give the student and fake real angles
        for p in d.parameters("student") + d.parameters("fake"):
            p.add_(0.05 * torch.randn_like(p))
    return d


def test_teacher_encodes_and_denoises_as_the_diffusers_pipeline(sdxl_dir: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    teacher = load_teacher(sdxl_dir)
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    assert teacher.family == "sdxl" and teacher.latent_shape == (4, 8, 8) and teacher.max_text_length == 77
    assert teacher.zero_null_prompt  # force_zeros_for_empty_prompt, SDXL's default
    with torch.no_grad():
        cond = teacher.encode_prompts(PROMPTS)
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    # penultimate states of CLIP-L (32) and bigG (48) side by side; pooled = bigG's projection (40)
    assert cond.embeds.shape == (4, 77, 80) and cond.pooled.shape == (4, 40) and cond.mask is None
    torch.testing.assert_close(cond.embeds, embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=0)
    # The null prompt is the pipeline's unconditional branch without a negative prompt: zeros.
    null = teacher.null_cond(4)
    torch.testing.assert_close(null.embeds, neg, rtol=0, atol=0)
    torch.testing.assert_close(null.pooled, neg_pooled, rtol=0, atol=0)
    assert not null.embeds.any() and not null.pooled.any()
    assert cond.embeds[2].any()  # a training caption "" is still encoded (only the null prompt is zeros)

    # predict_eps = the UNet with the pipeline's added conditioning at its default 32 px size.
    z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    time_ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), dtype=embeds.dtype, text_encoder_projection_dim=40)
    with torch.no_grad():
        want = pipe.unet(z, 500, encoder_hidden_states=embeds, return_dict=False,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.repeat(4, 1)})[0]
        got = teacher.predict_eps(z, 500, cond)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert time_ids.tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]
    with torch.no_grad():  # the pooled embedding and the time ids do condition the output
        other = teacher.predict_eps(z, 500, type(cond)(cond.embeds, None, cond.pooled.flip(0)))
        bigger = teacher.predict_eps(torch.randn(4, 4, 16, 16), 500, cond)
    assert (other - got).abs().max() > 1e-4 and bigger.shape == (4, 4, 16, 16)


def test_a_cond_without_pooled_embeddings_is_refused_with_the_fix(sdxl_dir: Path) -> None:
    from wadi_core.models import Cond

    teacher = load_teacher(sdxl_dir)
    cond = teacher.encode_prompts(PROMPTS[:1])
    with pytest.raises(ValueError, match=r"needs pooled text embeddings.*Cond\(embeds, None, pooled\)"):
        teacher.predict_eps(torch.randn(1, 4, 8, 8), 10, Cond(cond.embeds))


def test_cond_carries_pooled_through_cat_where_rows_and_dtype() -> None:
    from wadi_core.models import Cond

    a, b = Cond(torch.zeros(2, 3, 4), None, torch.zeros(2, 5)), Cond(torch.ones(2, 3, 4), None, torch.ones(2, 5))
    both = Cond.cat([a, b])
    assert both.pooled.shape == (4, 5) and both.pooled[2:].eq(1).all()
    mixed = a.where(torch.tensor([True, False]), b)
    assert mixed.pooled[:, 0].tolist() == [1.0, 0.0] and mixed.embeds[:, 0, 0].tolist() == [1.0, 0.0]
    assert both.rows(1, 3).pooled[:, 0].tolist() == [0.0, 1.0]
    assert both.to_dtype(torch.bfloat16).pooled.dtype == torch.bfloat16 and both.detach().pooled is not None
    assert Cond.cat([a, Cond(torch.ones(2, 3, 4))]).pooled is None  # all or nothing, as the mask


def test_one_vsd_step_trains_only_the_adapters(sdxl_dir: Path) -> None:
    d = _distiller(sdxl_dir, guidance_real=5.0, guidance_fake=5.0)
    base = {k: v.clone() for k, v in d.denoiser.state_dict().items() if "adapters." not in k}
    ups = make_updaters(d)
    before = [p.clone() for p in d.parameters("student")]
    cond, gen = d.teacher.encode_prompts(PROMPTS), torch.Generator().manual_seed(0)
    # Step 1: fake == teacher, so g = 0; step 2 sees the fake's first update.
    metrics = [vsd_step(d, cond, ups["student"], ups["fake"], gen) for _ in range(2)][-1]
    assert all(np.isfinite(v) for v in metrics.values())
    assert metrics["grad_norm_fake"] > 0 and metrics["grad_norm_student"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, d.parameters("student")))
    assert all(torch.equal(d.denoiser.state_dict()[k], v) for k, v in base.items())
    adapted = {n.rsplit(".adapters", 1)[0] for n, _ in d.denoiser.named_parameters() if ".adapters." in n}
    assert adapted and not any(n.startswith(("add_embedding", "time_embedding")) for n in adapted)


def test_export_loads_with_from_pretrained_and_reproduces_the_training_x0(sdxl_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    from wadi_core.adapters import AdaptedLinear
    from wadi_core.export import export_one_step_pipeline
    from wadi_core.vsd import x0_from_eps

    d = _trained_looking(_distiller(sdxl_dir))
    out = export_one_step_pipeline(d, tmp_path / "export")
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert not any(isinstance(m, AdaptedLinear) for m in pipe.unet.modules())
    assert pipe.config.force_zeros_for_empty_prompt and pipe.scheduler.config.timestep_spacing == "trailing"
    assert float(pipe.scheduler.alphas_cumprod[999]) == pytest.approx(0.0047, rel=1e-6)

    prompts = PROMPTS[:2]
    z = torch.randn(2, *d.teacher.latent_shape, generator=torch.Generator().manual_seed(0))
    kwargs = dict(num_inference_steps=1, guidance_scale=1.0)
    with torch.no_grad():
        latents = pipe(prompts, latents=z.clone(), output_type="latent", **kwargs).images
        images = pipe(prompts, latents=z.clone(), output_type="pt", **kwargs).images
        x0_train = d.generate(z, d.teacher.encode_prompts(prompts))
        expected = d.sample(prompts, z=z)
        e_teacher = d.eps("teacher", z, torch.full((2,), 999), d.teacher.encode_prompts(prompts))
        teacher_images = d.teacher.decode(x0_from_eps(z, e_teacher, d.abar(torch.full((2,), 999))))
    torch.testing.assert_close(latents.float(), x0_train, rtol=1e-4, atol=1e-4)
    assert images.shape == expected.shape == (2, 3, 32, 32)
    torch.testing.assert_close(images.float(), expected, rtol=0, atol=2e-4)
    assert (images.float() - teacher_images).abs().max() > 10 * 2e-4  # the student, not the teacher


def test_export_of_a_teacher_trained_without_its_text_encoders_copies_both(sdxl_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    from wadi_core.adapters import adapter_state_dict
    from wadi_core.export import export_one_step_pipeline

    d = _trained_looking(_distiller(sdxl_dir))
    bare = load_teacher(sdxl_dir, text_encoder=False)
    out = export_one_step_pipeline(bare, tmp_path / "export", cfg=d.cfg,
                                   student_state=adapter_state_dict(d.denoiser, "student"))
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = pipe(PROMPTS[:1], latents=z.clone(), num_inference_steps=1, guidance_scale=1.0,
                   output_type="latent").images
        want = d.generate(z, d.teacher.encode_prompts(PROMPTS[:1]))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_single_file_export_loads_with_from_single_file(sdxl_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    from wadi_core.export import export_one_step_pipeline
    from wadi_core.export_formats import save_single_file

    export = export_one_step_pipeline(_trained_looking(_distiller(sdxl_dir)), tmp_path / "export")
    path = save_single_file(export, tmp_path / "student.safetensors")
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert meta["wadi.layout"] == "ldm-stable-diffusion-xl" and "wadi.scheduler_config" in meta
    assert {"model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.1.model.text_projection",
            "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
            "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"} <= keys

    # offline: the configs come from the export folder (config=), the weights from the single file
    single = StableDiffusionXLPipeline.from_single_file(str(path), config=str(export), local_files_only=True)
    reference = StableDiffusionXLPipeline.from_pretrained(export)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(reference, name).state_dict(), getattr(single, name).state_dict()
        assert set(got) == set(want), name
        assert all(torch.equal(got[k], v) for k, v in want.items()), name
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    kwargs = dict(num_inference_steps=1, guidance_scale=1.0, output_type="pt")
    with torch.no_grad():
        torch.testing.assert_close(single(PROMPTS[:1], latents=z.clone(), **kwargs).images,
                                   reference(PROMPTS[:1], latents=z.clone(), **kwargs).images, rtol=0, atol=1e-5)


def test_actor_rows_carry_the_pooled_embedding(sdxl_dir: Path) -> None:
    from conftest import actor_rows
    from pipelines.data.text_encoding import EncodedPrompts, remember_conds

    full = load_teacher(sdxl_dir)
    want = full.encode_prompts(PROMPTS)
    rows = actor_rows(sdxl_dir, PROMPTS, bad=2)
    assert "mask" not in rows and rows["embeds"].shape == (4, 77, 80) and rows["pooled"].shape == (4, 40)
    assert not rows["pooled"][2].any()  # a bad row is not encoded
    good = [0, 1, 3]
    # the rows as the prompt batcher hands them over: (caption, embeds, mask, pooled)
    batch = EncodedPrompts.stack([(PROMPTS[i], rows["embeds"][i], None, rows["pooled"][i]) for i in good])
    got = batch.cond("cpu", torch.float32)
    want_good = full.encode_prompts([PROMPTS[i] for i in good])  # same batch: the same BLAS calls, bit-exact
    assert torch.equal(got.embeds, want_good.embeds) and torch.equal(got.pooled, want_good.pooled)

    # bf16 rows come back bit-exact; a trainer without text encoders gets the fixed prompts from them
    rows16 = actor_rows(sdxl_dir, PROMPTS, "bfloat16")
    assert rows16["pooled"].dtype == np.uint16
    bare = load_teacher(sdxl_dir, text_encoder=False)
    remember_conds(bare, {"prompts": PROMPTS, "embeds": rows["embeds"], "mask": None, "pooled": rows["pooled"]})
    assert bare.text_encoder is None and bare.zero_null_prompt
    assert torch.equal(bare.null_cond(2).pooled, full.null_cond(2).pooled)  # zeros, as the full teacher
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():  # the actor encoded another batch size than ``want``: float rounding apart
        torch.testing.assert_close(bare.predict_eps(z, 300, bare.encode_prompts(PROMPTS[:2])),
                                   full.predict_eps(z, 300, want.rows(0, 2)), rtol=0, atol=1e-5)


def test_published_sdxl_architecture_and_layer_sets_on_meta() -> None:
    from wadi_core.adapters import apply_adapter, count_trainable
    from wadi_core.models import build_denoiser_on_meta, denoiser_config, family_of_config

    config = denoiser_config("sdxl")
    assert family_of_config(config) == "sdxl" and family_of_config(denoiser_config("sd15")) == "sd"
    with torch.device("meta"):
        unet = build_denoiser_on_meta(config)
        assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # stable-diffusion-xl-base-1.0's UNet
        student = apply_adapter(unet, AdapterSpec("lorad", 256), "student", "sdxl")
        fake = apply_adapter(unet, AdapterSpec("lorad", 32), "fake", "sdxl")
    assert (count_trainable(unet, "student"), count_trainable(unet, "fake")) == (530_595_840, 64_491_520)
    assert set(fake) < set(student) and len(student) == 739  # 743 Linears less time_embedding's and add_embedding's
    assert not any(n.startswith(("add_embedding", "time_embedding")) for n in student)
    assert not any(n.rsplit(".", 1)[-1] in ("proj_in", "proj_out", "time_emb_proj") for n in fake)


def test_sdxl_recipe_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    from jobs import distill
    from pipelines.config.job import load_config

    cfg = load_config("sdxl")
    assert cfg.architecture == "sdxl" and cfg.data.text_encoding == "actors" and cfg.vsd.mixed_precision == "bf16"
    assert (cfg.train.global_batch, cfg.train.per_worker_batch, cfg.vsd.guidance_real) == (128, 2, 8.0)
    assert distill.main(["--config", "sdxl", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "teacher           stabilityai/stable-diffusion-xl-base-1.0 (sdxl)" in out
    assert "denoiser params   2,567.46 M" in out
    assert "trainable student 530.60 M (530,595,840) lorad r=256 on unet_student" in out
    assert "trainable fake    64.49 M (64,491,520) lorad r=32 on unet_fake" in out
