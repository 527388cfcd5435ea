"""``vsd.mixed_precision`` bf16 / fp16 as the official code runs it: the frozen base in half precision,
the adapters' angles and their optimizer state in fp32, the forward under torch.autocast; DeepSpeed's
engines stay fp32 (no bf16 / fp16 section) and ``DeepSpeedUpdater`` scales the loss for fp16."""

from __future__ import annotations

import pytest
import torch

from conftest import deepspeed_engines, deepspeed_world_of_one
from wadi_core.adapters import adapted_layers, use_adapter
from wadi_core.models import load_teacher
from wadi_core.models.tiny import save_tiny_pipeline
from wadi_core.vsd import AdapterSpec, VSDConfig, WaDiDistiller, vsd_step

PROMPTS = ["a red circle", "a small blue square on the left"]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"), "sd", seed=0)


@pytest.fixture
def ds_world():
    pytest.importorskip("deepspeed")
    with deepspeed_world_of_one():
        yield


def _distiller(sd_dir, mixed_precision: str) -> WaDiDistiller:
    torch.manual_seed(0)
    return WaDiDistiller(load_teacher(sd_dir), VSDConfig(student=AdapterSpec("lorad", 4), fake=AdapterSpec("lorad", 2),
                                                         gen_lr=1e-3, fake_lr=1e-2, mixed_precision=mixed_precision))


@pytest.mark.parametrize("mixed_precision,base", [("no", torch.float32), ("bf16", torch.bfloat16),
                                                  ("fp16", torch.float16)])
def test_mixed_precision_halves_the_base_and_keeps_fp32_adapters(sd_dir, mixed_precision, base):
    d = _distiller(sd_dir, mixed_precision)
    frozen = [p for n, p in d.denoiser.named_parameters() if "adapters." not in n]
    assert {p.dtype for p in frozen} == {base}  # "no" (the embedded default): the fp32 base as loaded
    assert {p.dtype for r in ("student", "fake") for p in d.parameters(r)} == {torch.float32}


def _merged_reference(sd_dir, d: WaDiDistiller, role: str) -> torch.nn.Module:
    """A fresh bf16 denoiser with ``role``'s adapter merged into plain Linears: W_rot computed from the
    fp32 angles, stored in bf16 (the official code's weights under autocast), no adapter code in the path."""
    ref = load_teacher(sd_dir, dtype=torch.bfloat16).denoiser
    for name, layer in adapted_layers(d.denoiser, role).items():
        ref.get_submodule(name).weight.data.copy_(layer.adapters[role].merged_weight(layer))
    return ref


def test_bf16_deepspeed_step_keeps_fp32_adapters_and_matches_an_autocast_reference(sd_dir, ds_world):
    """After a ZeRO-2 step under bf16 the adapters (engine module and optimizer partitions) are fp32,
    and the adapted forward equals a plain autocast forward of the merged bf16 weights: both run the
    same bf16 matmuls, so they agree to 1 % of the output's scale, 10x closer than to the fp32 forward."""
    from pipelines.config.job import TrainConfig
    from pipelines.train.engines import DeepSpeedUpdater, deepspeed_config

    d = _distiller(sd_dir, "bf16")
    with torch.no_grad():  # a fake score away from the teacher, so the student has a gradient
        for p in d.parameters("fake"):
            p.add_(0.1 * torch.randn_like(p))
    train = TrainConfig(global_batch=len(PROMPTS), num_workers=1, zero_stage=2)
    assert not {"bf16", "fp16"} & set(deepspeed_config(train, d.cfg))
    engines = deepspeed_engines(d, len(PROMPTS))
    updaters = {r: DeepSpeedUpdater(e) for r, e in engines.items()}
    before = [p.detach().clone() for p in d.parameters("student")]
    m = vsd_step(d, d.teacher.encode_prompts(PROMPTS), updaters["student"], updaters["fake"],
                 torch.Generator().manual_seed(0))
    assert m["skipped_nonfinite"] == 0.0
    assert any(not torch.equal(a, b) for a, b in zip(before, d.parameters("student")))  # it stepped
    for r, e in engines.items():
        assert {p.dtype for p in e.module.parameters()} == {torch.float32}, r
        assert {p.dtype for g in e.optimizer.optimizer.param_groups for p in g["params"]} == {torch.float32}, r
        assert {v.dtype for s in e.optimizer.optimizer.state.values() for v in s.values()
                if torch.is_tensor(v) and v.dim()} == {torch.float32}, r

    cond = d.teacher.encode_prompts(PROMPTS)
    x = torch.randn(len(PROMPTS), *d.teacher.latent_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 500])
    with torch.no_grad():
        ours = d.eps("student", x, t, cond)
        ref_model = _merged_reference(sd_dir, d, "student")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = ref_model(x.to(torch.bfloat16), t, cond.embeds).sample.float()
        fp32 = load_teacher(sd_dir).denoiser
        for name, layer in adapted_layers(d.denoiser, "student").items():
            fp32.get_submodule(name).weight.data.copy_(layer.adapters["student"].merged_weight(layer).float())
        full = fp32(x, t, cond.embeds.float()).sample
    scale = ref.abs().max().item()
    ours_vs_ref = (ours - ref).abs().max().item()
    assert ours_vs_ref <= 1e-2 * scale, (ours_vs_ref, scale)
    assert (ours - full).abs().max().item() > 10 * ours_vs_ref  # bf16 rounding is really in both paths


@pytest.mark.parametrize("stage", [0, 2])
def test_fp16_loss_scaling_in_the_deepspeed_updater(ds_world, stage):
    """fp16: the loss is scaled by 2^16 for backward and unscaled before DeepSpeed clips and steps, so
    the step equals the unscaled one; an overflow of the scaled gradients halves the scale and skips
    the step (the scaler's business, not counted as non-finite), and the next step applies."""
    from pipelines.config.job import TrainConfig
    from pipelines.train.engines import DeepSpeedUpdater, build_engine

    train = TrainConfig(global_batch=2, num_workers=1, zero_stage=stage)

    def run(fp16: bool, boost: float = 1.0):
        torch.manual_seed(0)
        module = torch.nn.ModuleList([torch.nn.Linear(8, 8)])
        updater = DeepSpeedUpdater(build_engine(module, 1e-2, train, VSDConfig(grad_clip=0.5)), fp16=fp16)
        updater.backward(boost * (module[0](torch.randn(2, 8)) * 100).pow(2).mean())
        return module, updater, updater.step()

    plain, _, plain_step = run(False)
    scaled, up, scaled_step = run(True)
    assert up.loss_scale == 2.0 ** 16 and scaled_step.stepped and plain_step.grad_norm > 0.5
    assert scaled_step.grad_norm == pytest.approx(plain_step.grad_norm, rel=1e-5)
    torch.testing.assert_close(scaled[0].weight, plain[0].weight, rtol=1e-5, atol=1e-7)

    # 1e34 x the loss: fine in fp32 unscaled (~1e38 at most), inf once scaled by 2^16.
    overflowing, up, step = run(True, boost=1e34)
    torch.manual_seed(0)
    untouched = torch.nn.Linear(8, 8).weight
    assert step.stepped and not torch.isfinite(torch.tensor(step.grad_norm))
    assert up.loss_scale == 2.0 ** 15
    torch.testing.assert_close(overflowing[0].weight, untouched, rtol=0, atol=0)
    up.backward((overflowing[0](torch.randn(2, 8)) * 100).pow(2).mean())
    assert up.step().stepped and not torch.equal(overflowing[0].weight, untouched)


def test_fp16_forward_runs_in_half_on_an_fp16_base(sd_dir):
    """The fp16 recipe's forward on the CPU: an fp16 base, fp32 angles, autocast fp16, fp32 output."""
    d = _distiller(sd_dir, "fp16")
    cond = d.teacher.encode_prompts(PROMPTS)
    x = torch.randn(len(PROMPTS), *d.teacher.latent_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        e = d.eps("student", x, torch.tensor([999, 500]), cond)
        with use_adapter(d.denoiser, None):
            fp32 = load_teacher(sd_dir).denoiser(x, torch.tensor([999, 500]), cond.embeds.float()).sample
    assert e.dtype == torch.float32 and torch.isfinite(e).all()
    assert 0 < (e - fp32).abs().max().item() < 0.05 * fp32.abs().max().item()  # A = 0: the teacher, in fp16


def test_export_after_bf16_training_is_an_fp32_pipeline(sd_dir, tmp_path):
    """A bf16 base does not leak into the export: the merged denoiser is fp32 like the VAE and text
    encoder it is saved with, and the exported pipeline samples."""
    from diffusers import DiffusionPipeline

    from wadi_core.export import export_one_step_pipeline

    d = _distiller(sd_dir, "bf16")
    out = export_one_step_pipeline(d, tmp_path / "export")
    pipe = DiffusionPipeline.from_pretrained(out)
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.float32}
    image = pipe("a red circle", num_inference_steps=1, guidance_scale=1.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape[-1] == 3 and (image >= 0).all() and (image <= 1).all()
