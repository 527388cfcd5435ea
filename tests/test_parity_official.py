"""Parity of ``vsd_step`` with the official WaDi training step (train_dkd_sd.py / train_dkd_dit.py).

The oracle (tests/official_oracle.py) is our own plain-torch transcription of the official update, with
its constants: three separate denoisers (teacher, fake score, student), LoRaD applied as a forward hook
that rebuilds each adapted Linear from its rotated weight (as the public code does), the layer sets
picked by the official code's own substring rules, the one-step parametrisation
x0 = (z - sqrt(1 - 0.0047) eps_hat) / sqrt(0.0047), generator timesteps U{20..980}, CFG on teacher and
fake, g = nan_to_num((1 - abar_t)(e_real - e_fake)), L_G = 0.5 mse(x0, stopgrad(x0 - g)); fake timesteps
U{0..999}, L_F = mse(sqrt(abar) e_fake, sqrt(abar) eps); grad-norm clip 1.0; AdamW (eps 1e-8, wd 0) at
1e-4 / 1e-2. The tiny models' gradient norms are ~1e-3, under the official clip: a second case clips at
1e-4 on both sides, so the clip acts. PixArt runs the official student set, ``adaln_single`` included
(our ``dit_student_adaln``).

Cases: fp32 and fp64 through the plain-torch updater; fp32 through the DeepSpeed updater (ZeRO-2, a
gloo world of one); bf16 autocast (base in bf16, adapters fp32) against the oracle in bf16 autocast.

Stated differences (docs/PARITY.md): the official code drops the prompt of the *whole* fake batch with
p = 0.1, we drop it per sample, so the oracle draws a per-sample mask; both sides consume the same random
stream in the same order: z, t, eps (generator step), then t_f, eps_f, drop mask (fake step). Under
autocast the official code rounds x0 to the half dtype; we and the oracle keep it in fp32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import deepspeed_world_of_one
from official_oracle import (OFFICIAL_A, official_layers, official_lorad_hook, official_model,
                             official_step, thetas)
from wadi_core.adapters import adapted_layers, add_adapter, set_adapter
from wadi_core.models import load_teacher
from wadi_core.models.tiny import save_tiny_pipeline
from wadi_core.vsd import AdapterSpec, VSDConfig, WaDiDistiller, make_updaters, vsd_step

PROMPTS = ["a red circle", "a small blue square on the left", "a green triangle", "a large yellow circle"]
GUIDANCE = 1.5            # launch scripts: --guidance_scale 1.5 (teacher and fake)
GEN_LR, FAKE_LR = 1e-4, 1e-2
NULL_PROB = 0.5           # official 0.1; 0.5 makes both branches show up in a 4-prompt batch
# The official student layer set per family (ours by name): PixArt's includes adaln_single.
STUDENT_TARGETS = {"sd": "auto", "pixart": "dit_student_adaln"}


def _ours(d: WaDiDistiller, role: str) -> dict[str, torch.Tensor]:
    return {k: v for name, layer in adapted_layers(d.denoiser, role).items()
            for k, v in ((f"{name}.A", layer.adapters[role].A), (f"{name}.B", layer.adapters[role].B))}


def _setup(tmp_path, family: str, dtype: torch.dtype, clip: float = 1.0, mixed_precision: str = "no"):
    """Our distiller (adapters randomised) and the three official models built from the same angles."""
    src = save_tiny_pipeline(tmp_path / "teacher", family, seed=0)
    cfg = VSDConfig(guidance_real=GUIDANCE, guidance_fake=GUIDANCE, gen_lr=GEN_LR, fake_lr=FAKE_LR,
                    null_prob=NULL_PROB, student=AdapterSpec("lorad", 4, STUDENT_TARGETS[family]),
                    fake=AdapterSpec("lorad", 2), grad_clip=clip, mixed_precision=mixed_precision)
    assert (cfg.t_min, cfg.t_max, cfg.student_alphabar, VSDConfig().grad_clip) == (20, 980, "auto", 1.0)
    torch.manual_seed(0)
    d = WaDiDistiller(load_teacher(src, dtype=dtype), cfg)
    assert d.student_alphabar == OFFICIAL_A  # "auto" on an eps teacher: the official constant
    with torch.no_grad():  # A starts at zero (identity); give both adapters angles so every path matters.
        # A fake score far from the teacher keeps the score gap (and so the student's gradients) well
        # above AdamW's eps = 1e-8, where the first step is ~lr * sign(grad) and fp32 rounding cannot flip it.
        for role, scale in (("student", 0.05), ("fake", 0.5)):
            for p in d.parameters(role):
                p.add_(scale * torch.randn_like(p))
    before = {role: {k: v.detach().clone() for k, v in _ours(d, role).items()} for role in ("student", "fake")}

    def pairs(role):
        return {name[:-2]: (before[role][name], before[role][name[:-2] + ".B"]) for name in before[role]
                if name.endswith(".A")}

    base_dtype = d.teacher.dtype  # the official code: the base in the half dtype too
    models = {"teacher": official_model(src, None, base_dtype),
              "student": official_model(src, pairs("student"), base_dtype),
              "fake": official_model(src, pairs("fake"), base_dtype)}
    # The layer sets: the official code's substring rules on a bare copy of the denoiser, against ours.
    for role in ("student", "fake"):
        assert set(adapted_layers(d.denoiser, role)) == official_layers(models["teacher"], family, role), role
    if family == "pixart":  # the official student set adapts the timestep embedding (adaln_single) too
        assert any(k.startswith("adaln_single.") for k in before["student"])
    return d, models, before


def _run_both(d: WaDiDistiller, models, family, updaters, clip, autocast=None):
    cond = d.teacher.encode_prompts(PROMPTS)
    null = d.teacher.null_cond(len(PROMPTS))
    shape = (len(PROMPTS), *d.teacher.latent_shape)
    ours = vsd_step(d, cond, updaters["student"], updaters["fake"], torch.Generator().manual_seed(123))
    official = official_step(family, models["teacher"], models["fake"], models["student"], d.teacher.alphas_cumprod,
                             cond, null, torch.Generator().manual_seed(123), shape, guidance=GUIDANCE,
                             gen_lr=GEN_LR, fake_lr=FAKE_LR, null_prob=NULL_PROB, clip=clip, autocast=autocast)
    return ours, official


# float32: the spec's precision. AdamW's first step is lr * g / (|g| + 1e-8): for the few angle
# gradients near 1e-8 the fp32 rounding of the score gap (a difference of two nearly equal
# predictions, amplified by 1/sqrt(0.0047)) moves the update by a few 1e-6, so fp32 is held to
# 1e-5 on the parameters; float64 removes that rounding and holds both implementations to 1e-6.
@pytest.mark.parametrize("clip", [1.0, 1e-4], ids=["official-clip", "clip-acts"])
@pytest.mark.parametrize("dtype,param_atol", [(torch.float32, 1e-5), (torch.float64, 1e-6)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("family", ["sd", "pixart"])
def test_vsd_step_matches_the_official_update(tmp_path, family, dtype, param_atol, clip):
    d, models, before = _setup(tmp_path, family, dtype, clip)
    updaters = make_updaters(d)
    ours, (loss_vsd, loss_fake, opt_s, opt_f) = _run_both(d, models, family, updaters, clip)

    assert ours["loss_gen"] == pytest.approx(loss_vsd, rel=1e-6, abs=1e-9)
    assert ours["loss_fake"] == pytest.approx(loss_fake, rel=1e-6, abs=1e-9)
    for role, opt in (("student", opt_s), ("fake", opt_f)):
        model = models[role]
        # AdamW's first moment after one step is 0.1 x the (clipped) gradient it stepped with: AdamW's
        # update itself, ~lr * sign(grad), hardly depends on how far the gradient was scaled down.
        pre_clip = ours[f"grad_norm_{role}"]
        m_official = {k: opt.state[v]["exp_avg"] for k, v in thetas(model).items()}
        m_mine = {k: updaters[role].optimizer.state[v]["exp_avg"] for k, v in _ours(d, role).items()}
        m_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in m_mine.values()])).item()
        clipped = pre_clip * min(1.0, clip / (pre_clip + 1e-6))  # as clip_grad_norm_
        assert m_norm == pytest.approx(0.1 * clipped, rel=1e-4), f"{role}: clipped norm"
        if clip < 1.0:
            assert pre_clip > 2 * clip, f"{role}: the clip must act in this case"
        scale = max(v.abs().max().item() for v in m_official.values())
        for k in m_mine:
            torch.testing.assert_close(m_mine[k], m_official[k], rtol=1e-4, atol=1e-4 * scale,
                                       msg=lambda m, role=role, k=k: f"{role} {k} exp_avg: {m}")
        _assert_same_parameters(d, role, model, before, param_atol)


def _assert_same_parameters(d, role, model, before, atol):
    official = {k: v.detach() for k, v in thetas(model).items()}
    mine = {k: v.detach() for k, v in _ours(d, role).items()}
    moved = max((mine[k] - before[role][k]).abs().max().item() for k in mine)
    assert moved > 1e-5, f"{role} adapter did not move"
    for k in mine:
        torch.testing.assert_close(mine[k], official[k], rtol=0, atol=atol,
                                   msg=lambda m, role=role, k=k: f"{role} {k}: {m}")


@pytest.mark.parametrize("clip", [1.0, 1e-4], ids=["official-clip", "clip-acts"])
def test_the_deepspeed_updater_matches_the_official_update(tmp_path, clip):
    """The same fp32 SD step through the pipelines' DeepSpeed engines (ZeRO-2, torch AdamW over flat
    fp32 partitions, DeepSpeed's clip): parameters held to the plain-torch case's 1e-5."""
    pytest.importorskip("deepspeed")
    from pipelines.config.job import TrainConfig
    from pipelines.train.engines import DeepSpeedUpdater, build_engine

    d, models, before = _setup(tmp_path, "sd", torch.float32, clip)
    train = TrainConfig(global_batch=len(PROMPTS), num_workers=1, zero_stage=2)
    with deepspeed_world_of_one():
        lrs = {"student": GEN_LR, "fake": FAKE_LR}
        engines = {r: build_engine(d.modules(r), lrs[r], train, d.cfg) for r in ("student", "fake")}
        assert all(e.zero_optimization_stage() == 2 for e in engines.values())
        updaters = {r: DeepSpeedUpdater(e) for r, e in engines.items()}
        ours, (loss_vsd, loss_fake, _, _) = _run_both(d, models, "sd", updaters, clip)
        assert ours["loss_gen"] == pytest.approx(loss_vsd, rel=1e-6, abs=1e-9)
        assert ours["loss_fake"] == pytest.approx(loss_fake, rel=1e-6, abs=1e-9)
        if clip < 1.0:
            assert min(ours["grad_norm_student"], ours["grad_norm_fake"]) > 2 * clip, "the clip must act"
        for role in ("student", "fake"):
            _assert_same_parameters(d, role, models[role], before, 1e-5)


# bf16: 8 mantissa bits. The official hook computes theta = A @ B, cos and sin in bf16 under autocast
# (ours: fp32 angles, W_rot rounded to bf16 once), so the two sides round differently. Measured
# (SD / PixArt): the fake loss agrees to 1.6e-4 / 8e-5 relative (held to 1e-3); the generator loss,
# 0.5 mean(g^2) with g a small difference of two bf16 predictions, to 0.4 % / 4.6 % (held to 10 %); the
# first moments (0.1 x the clipped gradient) point the same way, cosine 0.992 / 0.998 for the student,
# 0.9999 for the fake (held to 0.98), norms within 2.1 % (held to 5 %). AdamW's first step is
# ~lr * sign(grad), so a gradient element whose sign the rounding flips moves by 2 lr: 89.7 % / 97.6 % of
# the student's updates and 99.3 % / 99.7 % of the fake's agree to lr / 2 (held to 85 % and 98 %).
@pytest.mark.parametrize("family", ["sd", "pixart"])
def test_bf16_autocast_step_matches_the_official_update_in_bf16(tmp_path, family):
    d, models, before = _setup(tmp_path, family, torch.float32, mixed_precision="bf16")
    assert d.teacher.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for r in ("student", "fake")
                                                     for p in d.parameters(r))
    updaters = make_updaters(d)
    ours, (loss_vsd, loss_fake, opt_s, opt_f) = _run_both(d, models, family, updaters, 1.0, autocast=torch.bfloat16)
    assert ours["loss_gen"] == pytest.approx(loss_vsd, rel=0.1)
    assert ours["loss_fake"] == pytest.approx(loss_fake, rel=1e-3)
    for role, opt, lr, min_agree in (("student", opt_s, GEN_LR, 0.85), ("fake", opt_f, FAKE_LR, 0.98)):
        keys = list(_ours(d, role))
        m_off = torch.cat([opt.state[thetas(models[role])[k]]["exp_avg"].flatten() for k in keys])
        m_mine = torch.cat([updaters[role].optimizer.state[_ours(d, role)[k]]["exp_avg"].flatten() for k in keys])
        cosine = F.cosine_similarity(m_mine, m_off, dim=0).item()
        assert cosine >= 0.98, f"{role}: gradient direction, cosine {cosine:.4f}"
        assert m_mine.norm().item() == pytest.approx(m_off.norm().item(), rel=5e-2), f"{role}: gradient norm"
        step_mine = torch.cat([(_ours(d, role)[k].detach() - before[role][k]).flatten() for k in keys])
        step_off = torch.cat([(thetas(models[role])[k].detach() - before[role][k]).flatten() for k in keys])
        agree = ((step_mine - step_off).abs() <= lr / 2).float().mean().item()
        assert agree >= min_agree, f"{role}: {agree:.3f} of the updates agree"
        assert step_mine.abs().max().item() > lr / 2, f"{role} adapter did not move"


def test_lorad_layer_equals_the_official_hook_in_float64():
    """One adapted Linear, angles well beyond [-pi, pi) (the hook wraps them, rotations do not care)."""
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(64, 48)).double()
    official = torch.nn.Linear(64, 48).double()
    official.load_state_dict(ours[0].state_dict())
    add_adapter(ours, "lorad", "student", 8, ["0"])
    set_adapter(ours, "student")
    adapter = adapted_layers(ours, "student")["0"].adapters["student"]
    with torch.no_grad():
        adapter.A.copy_(3.0 * torch.randn_like(adapter.A))
        adapter.B.copy_(torch.randn_like(adapter.B))
    official.theta_a = torch.nn.Parameter(adapter.A.detach().clone())
    official.theta_b = torch.nn.Parameter(adapter.B.detach().clone())
    official.register_forward_hook(official_lorad_hook)
    x = torch.randn(5, 64, dtype=torch.float64)
    with torch.no_grad():
        mine, theirs, plain = ours(x), official(x), F.linear(x, official.weight, official.bias)
    assert (adapter.A @ adapter.B).abs().max() > 10  # the wrap matters to the hook
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)
    assert (mine - plain).abs().max() > 0.1  # the rotation is really applied


def test_the_old_squared_weight_would_fail_the_parity_check():
    """The fake-loss weight the spec used to give (abar^2) differs measurably from the official one."""
    from wadi_core.vsd import fake_score_loss

    abar = torch.tensor([0.9, 0.05])
    e, eps = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    official = F.mse_loss(abar.sqrt().view(-1, 1, 1, 1) * e, abar.sqrt().view(-1, 1, 1, 1) * eps)
    squared = F.mse_loss(abar.view(-1, 1, 1, 1) * e, abar.view(-1, 1, 1, 1) * eps)
    assert fake_score_loss(e, eps, abar).item() == pytest.approx(official.item())
    assert abs(official.item() - squared.item()) > 0.05
