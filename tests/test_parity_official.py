"""Parity of ``vsd_step`` with the official WaDi training step (train_dkd_sd.py / train_dkd_dit.py).

The oracle below is our own plain-torch transcription of the official update, with its constants:
three separate denoisers (teacher, fake score, student), LoRaD applied as a forward hook that
rebuilds each adapted Linear from its rotated weight (as the public code does), the one-step
parametrisation x0 = (z - sqrt(1 - 0.0047) eps_hat) / sqrt(0.0047), generator timesteps
U{20..980}, CFG on teacher and fake, g = nan_to_num((1 - abar_t)(e_real - e_fake)),
L_G = 0.5 mse(x0, stopgrad(x0 - g)); fake timesteps U{0..999}, L_F = mse(sqrt(abar) e_fake,
sqrt(abar) eps); grad-norm clip 1.0; AdamW (eps 1e-8, wd 0) at 1e-4 / 1e-2. The tiny models' gradient
norms are ~1e-3, under the official clip: a second case clips at 1e-4 on both sides, so the clip acts.

One stated difference: the official code drops the prompt of the *whole* fake batch with p = 0.1;
we drop it per sample (same expectation, lower variance), so the oracle draws a per-sample mask.
Both sides consume the same random stream in the same order: z, t, eps (generator step), then
t_f, eps_f, drop mask (fake step).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wadi_core.adapters import adapted_layers
from wadi_core.models import load_teacher
from wadi_core.models.tiny import save_tiny_pipeline
from wadi_core.vsd import AdapterSpec, VSDConfig, WaDiDistiller, make_updaters, vsd_step

PROMPTS = ["a red circle", "a small blue square on the left", "a green triangle", "a large yellow circle"]
OFFICIAL_A = 0.0047       # alphabar of the official one-step parametrisation (SD and PixArt alike)
GUIDANCE = 1.5            # launch scripts: --guidance_scale 1.5 (teacher and fake)
GEN_LR, FAKE_LR = 1e-4, 1e-2
NULL_PROB = 0.5           # official 0.1; 0.5 makes both branches show up in a 4-prompt batch


def _official_lorad_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """The public code's forward hook: W_rot from theta = theta_a @ theta_b, wrapped to [-pi, pi)."""
    w = module.weight
    theta = module.theta_a @ module.theta_b
    theta = ((theta + math.pi) % (2 * math.pi)) - math.pi
    cos, sin = torch.cos(theta), torch.sin(theta)
    w_odd, w_even = w[:, 0::2], w[:, 1::2]
    w_rot = torch.empty_like(w)
    w_rot[:, 0::2] = w_odd * cos - w_even * sin
    w_rot[:, 1::2] = w_odd * sin + w_even * cos
    out = F.linear(inputs[0], w_rot)
    if module.bias is not None:
        out = out + module.bias
    return out


def _official_model(src, adapter: dict[str, tuple[torch.Tensor, torch.Tensor]] | None, dtype) -> nn.Module:
    """A separate copy of the teacher denoiser; with ``adapter`` (name -> (A, B)) LoRaD hooks on it."""
    den = load_teacher(src, dtype=dtype).denoiser
    den.requires_grad_(False)
    for name, (a, b) in (adapter or {}).items():
        lin = den.get_submodule(name)
        lin.theta_a = nn.Parameter(a.detach().clone())
        lin.theta_b = nn.Parameter(b.detach().clone())
        lin.register_forward_hook(_official_lorad_hook)
    return den


def _thetas(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "theta_a"):
            out[f"{name}.A"], out[f"{name}.B"] = mod.theta_a, mod.theta_b
    return out


def _ours(d: WaDiDistiller, role: str) -> dict[str, torch.Tensor]:
    return {k: v for name, layer in adapted_layers(d.denoiser, role).items()
            for k, v in ((f"{name}.A", layer.adapters[role].A), (f"{name}.B", layer.adapters[role].B))}


def _official_step(family, teacher, fake, student, alphas_cumprod, cond, null, gen, shape, clip=1.0):
    """One iteration of the official loop, transcribed (grad-norm clip ``clip``, officially 1.0);
    returns (loss_vsd, loss_fake, student optimizer, fake optimizer)."""
    n, dtype = cond.embeds.shape[0], cond.embeds.dtype

    def call(model, x, t, c):
        if family == "pixart":
            return model(x, encoder_hidden_states=c.embeds, encoder_attention_mask=c.mask, timestep=t,
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample.chunk(2, 1)[0]
        return model(x, t, c.embeds).sample

    def add_noise(x0, noise, t):  # DDPMScheduler.add_noise
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        return ab ** 0.5 * x0 + (1 - ab) ** 0.5 * noise

    opt_s = torch.optim.AdamW(_thetas(student).values(), lr=GEN_LR,
                              betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    opt_f = torch.optim.AdamW(_thetas(fake).values(), lr=FAKE_LR, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)

    # Generator (predict_original): the student at t = 999, x0 with the hard-coded 0.0047.
    z = torch.randn(shape, generator=gen).to(dtype)
    alpha_T, sigma_T = OFFICIAL_A ** 0.5, (1 - OFFICIAL_A) ** 0.5
    x0 = (z - sigma_T * call(student, z, torch.full((n,), 999), cond)) / alpha_T
    t = torch.randint(20, 981, (n,), generator=gen)
    noisy = add_noise(x0, torch.randn(shape, generator=gen).to(dtype), t)
    with torch.no_grad():
        real = call(teacher, noisy, t, null) + GUIDANCE * (call(teacher, noisy, t, cond) - call(teacher, noisy, t, null))
        fk = call(fake, noisy, t, null) + GUIDANCE * (call(fake, noisy, t, cond) - call(fake, noisy, t, null))
    sigma_t = ((1 - alphas_cumprod[t]) ** 0.5).view(-1, 1, 1, 1)
    g = torch.nan_to_num(sigma_t ** 2 * (real - fk))
    up = torch.promote_types(dtype, torch.float32)  # the official .float(): upcast, never down from float64
    loss_vsd = 0.5 * F.mse_loss(x0.to(up), (x0 - g).detach().to(up))
    loss_vsd.backward()
    torch.nn.utils.clip_grad_norm_(list(_thetas(student).values()), clip)
    opt_s.step()

    # Fake score: denoising on the detached sample, per-sample weight abar_t.
    t_f = torch.randint(0, 1000, (n,), generator=gen)
    noise = torch.randn(shape, generator=gen).to(dtype)
    noisy = add_noise(x0.detach(), noise, t_f)
    drop = torch.rand(n, generator=gen) < NULL_PROB
    c = type(cond)(torch.where(drop.view(-1, 1, 1), null.embeds, cond.embeds),
                   None if cond.mask is None else torch.where(drop.view(-1, 1), null.mask, cond.mask))
    alpha_t = (alphas_cumprod[t_f] ** 0.5).view(-1, 1, 1, 1)
    loss_fake = F.mse_loss((alpha_t * call(fake, noisy, t_f, c)).to(up), (alpha_t * noise).to(up))
    loss_fake.backward()
    torch.nn.utils.clip_grad_norm_(list(_thetas(fake).values()), clip)
    opt_f.step()
    return float(loss_vsd.detach()), float(loss_fake.detach()), opt_s, opt_f


# float32: the spec's precision. AdamW's first step is lr * g / (|g| + 1e-8): for the few angle
# gradients near 1e-8 the fp32 rounding of the score gap (a difference of two nearly equal
# predictions, amplified by 1/sqrt(0.0047)) moves the update by a few 1e-6, so fp32 is held to
# 1e-5 on the parameters; float64 removes that rounding and holds both implementations to 1e-6.
@pytest.mark.parametrize("clip", [1.0, 1e-4], ids=["official-clip", "clip-acts"])
@pytest.mark.parametrize("dtype,param_atol", [(torch.float32, 1e-5), (torch.float64, 1e-6)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("family", ["sd", "pixart"])
def test_vsd_step_matches_the_official_update(tmp_path, family, dtype, param_atol, clip):
    src = save_tiny_pipeline(tmp_path / "teacher", family, seed=0)
    cfg = VSDConfig(guidance_real=GUIDANCE, guidance_fake=GUIDANCE, gen_lr=GEN_LR, fake_lr=FAKE_LR,
                    null_prob=NULL_PROB, student=AdapterSpec("lorad", 4), fake=AdapterSpec("lorad", 2), grad_clip=clip)
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

    teacher = _official_model(src, None, dtype)
    student = _official_model(src, pairs("student"), dtype)
    fake = _official_model(src, pairs("fake"), dtype)
    # The official student/fake layer sets are ours (PixArt: the paper's, without adaln_single).
    assert set(_thetas(student)) == set(before["student"]) and set(_thetas(fake)) == set(before["fake"])

    cond = d.teacher.encode_prompts(PROMPTS)
    null = d.teacher.null_cond(len(PROMPTS))
    shape = (len(PROMPTS), *d.teacher.latent_shape)
    updaters = make_updaters(d)
    ours = vsd_step(d, cond, updaters["student"], updaters["fake"], torch.Generator().manual_seed(123))
    loss_vsd, loss_fake, opt_s, opt_f = _official_step(family, teacher, fake, student, d.teacher.alphas_cumprod,
                                                       cond, null, torch.Generator().manual_seed(123), shape, clip)

    assert ours["loss_gen"] == pytest.approx(loss_vsd, rel=1e-6, abs=1e-9)
    assert ours["loss_fake"] == pytest.approx(loss_fake, rel=1e-6, abs=1e-9)
    for role, model, opt in (("student", student, opt_s), ("fake", fake, opt_f)):
        # AdamW's first moment after one step is 0.1 x the (clipped) gradient it stepped with: AdamW's
        # update itself, ~lr * sign(grad), hardly depends on how far the gradient was scaled down.
        pre_clip = ours[f"grad_norm_{role}"]
        m_official = {k: opt.state[v]["exp_avg"] for k, v in _thetas(model).items()}
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
        official = {k: v.detach() for k, v in _thetas(model).items()}
        mine = {k: v.detach() for k, v in _ours(d, role).items()}
        moved = max((mine[k] - before[role][k]).abs().max().item() for k in mine)
        assert moved > 1e-5, f"{role} adapter did not move"
        for k in mine:
            torch.testing.assert_close(mine[k], official[k], rtol=0, atol=param_atol, msg=lambda m, role=role, k=k: f"{role} {k}: {m}")


def test_the_old_squared_weight_would_fail_the_parity_check():
    """The fake-loss weight the spec used to give (abar^2) differs measurably from the official one."""
    from wadi_core.vsd import fake_score_loss

    abar = torch.tensor([0.9, 0.05])
    e, eps = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    official = F.mse_loss(abar.sqrt().view(-1, 1, 1, 1) * e, abar.sqrt().view(-1, 1, 1, 1) * eps)
    squared = F.mse_loss(abar.view(-1, 1, 1, 1) * e, abar.view(-1, 1, 1, 1) * eps)
    assert fake_score_loss(e, eps, abar).item() == pytest.approx(official.item())
    assert abs(official.item() - squared.item()) > 0.05
