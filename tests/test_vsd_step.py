"""vsd_step on a tiny SD teacher: shared frozen base, gradient isolation, learning, resume."""

from __future__ import annotations

import pytest
import torch

from wadi_core.models import load_teacher
from wadi_core.models.tiny import save_tiny_pipeline
from wadi_core.vsd import (AdapterSpec, TorchUpdater, TrainState, VSDConfig, WaDiDistiller, capture_train_state,
                           restore_train_state, vsd_step)
from wadi_core.vsd import make_updaters

PROMPTS = ["a red circle", "a small blue square on the left", "a green triangle", "a large yellow circle"]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"), "sd", seed=0)


def _distiller(sd_dir, **overrides) -> WaDiDistiller:
    kw = dict(student=AdapterSpec("lorad", 8), fake=AdapterSpec("lorad", 4), gen_lr=1e-3, fake_lr=1e-2)
    kw.update(overrides)
    torch.manual_seed(0)
    return WaDiDistiller(load_teacher(sd_dir), VSDConfig(**kw))


def _randomise(distiller: WaDiDistiller, role: str, scale: float = 0.05) -> None:
    """LoRaD starts as the identity (A = 0); give the adapter some angle so roles differ."""
    with torch.no_grad():
        for p in distiller.parameters(role):
            p.add_(scale * torch.randn_like(p))


class SpyUpdater(TorchUpdater):
    """Records, at each backward, which roles' parameters hold a gradient."""

    def __init__(self, params, lr, clip, watch: dict[str, list]):
        super().__init__(params, lr, clip)
        self.watch, self.seen = watch, []

    def backward(self, loss):
        super().backward(loss)
        self.seen.append({role: any(p.grad is not None and p.grad.abs().sum() > 0 for p in ps)
                          for role, ps in self.watch.items()})


@pytest.mark.parametrize("loss,fake_steps", [("vsd", 1), ("dmd2", 2)])
def test_base_bit_identical_and_each_adapter_gets_grads_only_in_its_update(sd_dir, loss, fake_steps):
    d = _distiller(sd_dir, loss=loss, fake_steps_per_gen=fake_steps)
    _randomise(d, "fake")
    base = {k: v.clone() for k, v in d.denoiser.state_dict().items() if "adapters." not in k}
    watch = {"student": d.parameters("student"), "fake": d.parameters("fake")}
    su = SpyUpdater(watch["student"], 1e-3, 1.0, watch)
    fu = SpyUpdater(watch["fake"], 1e-2, 1.0, watch)
    cond = d.teacher.encode_prompts(PROMPTS)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        metrics = vsd_step(d, cond, su, fu, gen)
    assert su.seen == [{"student": True, "fake": False}] * 3
    assert fu.seen == [{"student": False, "fake": True}] * (3 * fake_steps)
    state = d.denoiser.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert metrics["grad_norm_student"] > 0 and metrics["g_abs_mean"] > 0


def test_generator_is_the_closed_form_of_the_students_eps(sd_dir):
    d = _distiller(sd_dir)
    _randomise(d, "student")
    cond = d.teacher.encode_prompts(PROMPTS[:2])
    z = torch.randn(2, *d.teacher.latent_shape)
    from wadi_core.adapters import use_adapter

    with torch.no_grad():
        x0 = d.generate(z, cond)
        with use_adapter(d.denoiser, "student"):
            eps = d.denoiser(z, torch.tensor([999, 999]), encoder_hidden_states=cond.embeds).sample
        with use_adapter(d.denoiser, None):
            eps_teacher = d.denoiser(z, torch.tensor([999, 999]), encoder_hidden_states=cond.embeds).sample
    a = torch.tensor(0.0047)  # the official one-step parametrisation, not the schedule's alphabar_999
    assert d.student_alphabar == pytest.approx(0.0047)
    torch.testing.assert_close(x0, (z - (1 - a).sqrt() * eps) / a.sqrt())
    assert not torch.allclose(eps, eps_teacher)  # the student adapter is really in the path


def test_guided_eps_combines_separate_conditional_and_null_forwards(sd_dir):
    d = _distiller(sd_dir)
    _randomise(d, "fake")
    cond = d.teacher.encode_prompts(PROMPTS[:2])
    x, t = torch.randn(2, *d.teacher.latent_shape), torch.tensor([400, 60])
    with torch.no_grad():
        guided = d.guided_eps("fake", x, t, cond, 1.5)
        e_c = d.eps("fake", x, t, cond)
        e_u = d.eps("fake", x, t, d.teacher.null_cond(2))
    torch.testing.assert_close(guided, e_u + 1.5 * (e_c - e_u), rtol=1e-4, atol=1e-5)


def test_guided_eps_takes_one_scale_per_sample(sd_dir):
    d = _distiller(sd_dir)
    _randomise(d, "fake")
    cond = d.teacher.encode_prompts(PROMPTS[:2])
    x, t = torch.randn(2, *d.teacher.latent_shape), torch.tensor([400, 60])
    with torch.no_grad():
        mixed = d.guided_eps("fake", x, t, cond, torch.tensor([3.0, 1.0]))
        first = d.guided_eps("fake", x[:1], t[:1], d.teacher.encode_prompts(PROMPTS[:1]), 3.0)
        second = d.guided_eps("fake", x[1:], t[1:], d.teacher.encode_prompts(PROMPTS[1:2]), 1.0)
    torch.testing.assert_close(mixed, torch.cat([first, second]), rtol=1e-4, atol=1e-5)


def test_guidance_interval_switches_cfg_off_above_guidance_t_max(sd_dir):
    def student_update(**kw) -> torch.Tensor:
        d = _distiller(sd_dir, **kw)
        _randomise(d, "fake")
        before = torch.cat([p.detach().flatten().clone() for p in d.parameters("student")])
        u = make_updaters(d)
        vsd_step(d, d.teacher.encode_prompts(PROMPTS), u["student"], u["fake"], torch.Generator().manual_seed(0))
        return torch.cat([p.detach().flatten() for p in d.parameters("student")]) - before

    no_cfg = student_update(guidance_real=1.0, guidance_fake=1.0)
    # every generator timestep (t >= t_min = 20) lies above the interval: no guidance anywhere
    outside = student_update(guidance_real=3.0, guidance_fake=2.0, guidance_t_max=10)
    everywhere = student_update(guidance_real=3.0, guidance_fake=2.0)
    # Measured against the update itself: Adam's first step is ~lr * sign(grad), so the rounding of
    # another batch layout flips the few near-zero gradients (4e-4 of the update on an AVX-512 CPU);
    # guidance changes the update by about its own size (1.4x).
    assert (outside - no_cfg).norm() < 1e-2 * no_cfg.norm()
    assert (everywhere - no_cfg).norm() > 0.3 * no_cfg.norm()


def test_short_run_lowers_the_fake_loss_and_moves_the_student(sd_dir):
    from wadi_core.vsd import add_noise, fake_score_loss

    d = _distiller(sd_dir, fake_lr=3e-2)
    updaters = make_updaters(d)
    cond = d.teacher.encode_prompts(PROMPTS * 2)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, *d.teacher.latent_shape, generator=torch.Generator().manual_seed(5))
    # A fixed probe: the fake score's (alphabar-weighted) loss on the initial student samples.
    # On a random tiny UNet most of it is irreducible, so the drop is small but must be steady.
    with torch.no_grad():
        x0_probe = d.generate(z, cond)
    t = torch.linspace(0, 999, 8).long()
    eps = torch.randn(x0_probe.shape, generator=torch.Generator().manual_seed(6))

    def probe() -> float:
        with torch.no_grad():
            return float(fake_score_loss(d.eps("fake", add_noise(x0_probe, eps, d.abar(t)), t, cond), eps, d.abar(t)))

    probes = [probe()]
    for i in range(15):
        vsd_step(d, cond, updaters["student"], updaters["fake"], g)
        if i % 5 == 4:
            probes.append(probe())
    assert all(b < a for a, b in zip(probes, probes[1:])), probes
    with torch.no_grad():
        moved = (d.generate(z, cond) - x0_probe).abs().mean() / x0_probe.abs().mean()
    assert moved > 1e-3 and all(torch.isfinite(p).all() for p in d.parameters("student"))


def test_gradient_checkpointing_gives_the_same_student_gradients(sd_dir):
    grads = []
    for ckpt in (False, True):
        d = _distiller(sd_dir, gradient_checkpointing=ckpt)
        _randomise(d, "student")
        d.denoiser.train()
        cond = d.teacher.encode_prompts(PROMPTS[:2])
        z = torch.randn(2, *d.teacher.latent_shape, generator=torch.Generator().manual_seed(3))
        x0 = d.generate(z, cond)
        with d.role("student"):
            (x0 ** 2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in d.parameters("student")]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_bf16_autocast_step_keeps_fp32_adapters(sd_dir):
    d = _distiller(sd_dir, mixed_precision="bf16")
    up = make_updaters(d)
    m = vsd_step(d, d.teacher.encode_prompts(PROMPTS), up["student"], up["fake"], torch.Generator().manual_seed(0))
    assert all(p.dtype == torch.float32 for p in d.parameters("student") + d.parameters("fake"))
    assert all(torch.isfinite(torch.tensor(v)) for v in m.values())


def test_train_state_round_trip_resumes_exactly(sd_dir, tmp_path):
    def run(d, ups, gen, n):
        cond = d.teacher.encode_prompts(PROMPTS)
        return [vsd_step(d, cond, ups["student"], ups["fake"], gen) for _ in range(n)]

    d1 = _distiller(sd_dir)
    ups1, gen1 = make_updaters(d1), torch.Generator().manual_seed(0)
    run(d1, ups1, gen1, 2)
    capture_train_state(d1, ups1, gen1, step=2, data_position=8, meta={"note": "t"}).save(tmp_path / "state")
    expected = run(d1, ups1, gen1, 2)

    d2 = _distiller(sd_dir)
    ups2, gen2 = make_updaters(d2), torch.Generator().manual_seed(123)
    state = TrainState.load(tmp_path / "state")
    assert (state.step, state.data_position, state.meta["note"]) == (2, 8, "t")
    assert set(state.fingerprint) == {"teacher", "student", "fake"}  # checked on restore
    restore_train_state(state, d2, ups2, gen2)
    assert run(d2, ups2, gen2, 2) == expected


def test_pixart_teacher_runs_the_same_step(tmp_path):
    d = WaDiDistiller(load_teacher(save_tiny_pipeline(tmp_path / "pixart", "pixart")),
                      VSDConfig(student=AdapterSpec("lorad", 4), fake=AdapterSpec("lorad", 2)))
    base = {k: v.clone() for k, v in d.denoiser.state_dict().items() if "adapters." not in k}
    ups = make_updaters(d)
    before = [p.clone() for p in d.parameters("student")]
    cond, gen = d.teacher.encode_prompts(PROMPTS), torch.Generator().manual_seed(0)
    # Step 1: fake == teacher, so g = 0; step 2 sees the fake's first update.
    m = [vsd_step(d, cond, ups["student"], ups["fake"], gen) for _ in range(2)][-1]
    assert all(torch.isfinite(torch.tensor(v)) for v in m.values()) and m["grad_norm_fake"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, d.parameters("student")))
    assert all(torch.equal(d.denoiser.state_dict()[k], v) for k, v in base.items())


@pytest.mark.parametrize("scale", [100.0, 1e-3], ids=["over-the-clip", "under-the-clip"])
def test_torch_updater_clips_the_global_gradient_norm(scale):
    """Gradients over ``clip`` (global norm over all parameters) are scaled down to it, those under
    it are left alone; ``grad_norm`` is the norm before clipping. AdamW's first moment after one
    step is 0.1 x the gradient it stepped with (its update, ~lr * sign(grad), would not show it)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))]
    grads = [scale * torch.randn_like(p) for p in params]
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()
    updater = TorchUpdater(params, lr=1e-3, clip=0.5)
    updater.backward(sum((p * g).sum() for p, g in zip(params, grads)))  # d loss / d p = g
    result = updater.step()
    assert result.stepped and result.grad_norm == pytest.approx(norm, rel=1e-6)
    assert (norm > 0.5) == (scale > 1)
    coef = min(1.0, 0.5 / (norm + 1e-6))  # as torch.nn.utils.clip_grad_norm_
    for p, g in zip(params, grads):
        torch.testing.assert_close(updater.optimizer.state[p]["exp_avg"], 0.1 * coef * g)
