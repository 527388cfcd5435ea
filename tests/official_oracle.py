"""A plain-torch transcription of the official WaDi training code (gudaochangsheng/WaDi
``train_dkd_sd.py`` / ``train_dkd_dit.py``), used as the oracle of the parity tests.

Written from the official code, not from ours: the LoRaD forward hook, the substring rules that
pick the adapted layers, and one iteration of the training loop with its constants. The only
departure is stated where it happens (per-sample null prompt, see ``official_step``).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from wadi_core.models import load_teacher

OFFICIAL_A = 0.0047       # alphabar of the official one-step parametrisation (SD and PixArt alike)


# -- layer sets: the official register_hooks / register_hooks_teacher rules, transcribed ------------

def _sd_student_rule(name: str) -> bool:
    """train_dkd_sd.py register_hooks: Linears whose name contains up_blocks / down_blocks / mid_block,
    skip_layers = ["conv_shortcut"]."""
    return (("up_blocks" in name or "down_blocks" in name or "mid_block" in name)
            and not any(s in name for s in ["conv_shortcut"]))


def _sd_fake_rule(name: str) -> bool:
    """train_dkd_sd.py register_hooks_teacher: the same blocks, skip_layers = proj_in, proj_out, time_emb_proj."""
    return (("up_blocks" in name or "down_blocks" in name or "mid_block" in name)
            and not any(s in name for s in ["proj_in", "proj_out", "time_emb_proj"]))


def _dit_student_rule(name: str) -> bool:
    """train_dkd_dit.py register_hooks: every Linear (adaln_single included), skip_layers = ["conv_shortcut"]."""
    return not any(s in name for s in ["conv_shortcut"])


def _dit_fake_rule(name: str) -> bool:
    """train_dkd_dit.py register_hooks_teacher: "transformer_blocks" in the name, skip proj_in, proj_out,
    time_emb_proj."""
    return "transformer_blocks" in name and not any(s in name for s in ["proj_in", "proj_out", "time_emb_proj"])


_RULES = {("sd", "student"): _sd_student_rule, ("sd", "fake"): _sd_fake_rule,
          ("pixart", "student"): _dit_student_rule, ("pixart", "fake"): _dit_fake_rule}


def official_layers(model: nn.Module, family: str, role: str) -> set[str]:
    """Names of the Linears the official code hooks on ``model`` for ``role`` (student / fake)."""
    rule = _RULES[(family, role)]
    return {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and rule(name)}


# -- the LoRaD forward hook, transcribed -------------------------------------------------------------

def official_lorad_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """The public code's forward hook: W_rot from theta = theta_a @ theta_b, wrapped to [-pi, pi)
    (under autocast the matmul, cos / sin and the rotation run in whatever dtype autocast gives them)."""
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


def official_model(src, adapter: dict[str, tuple[torch.Tensor, torch.Tensor]] | None, dtype) -> nn.Module:
    """A separate copy of the teacher denoiser in ``dtype`` (the official code: fp16); with ``adapter``
    (name -> (A, B)) fp32 theta_a / theta_b and LoRaD hooks on those Linears."""
    den = load_teacher(src, dtype=dtype).denoiser
    den.requires_grad_(False)
    for name, (a, b) in (adapter or {}).items():
        lin = den.get_submodule(name)
        lin.theta_a = nn.Parameter(a.detach().clone().float() if dtype != torch.float64 else a.detach().clone())
        lin.theta_b = nn.Parameter(b.detach().clone().float() if dtype != torch.float64 else b.detach().clone())
        lin.register_forward_hook(official_lorad_hook)
    return den


def thetas(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<layer>.A": theta_a, "<layer>.B": theta_b}`` of a hooked official model."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "theta_a"):
            out[f"{name}.A"], out[f"{name}.B"] = mod.theta_a, mod.theta_b
    return out


def official_call(family: str, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    """The official denoiser call (PixArt: learned-sigma output, first half of the channels)."""
    if family == "pixart":
        return model(x, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask, timestep=t,
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample.chunk(2, 1)[0]
    return model(x, t, cond.embeds).sample


# -- one training iteration, transcribed -------------------------------------------------------------

def official_step(family, teacher, fake, student, alphas_cumprod, cond, null, gen, shape, *, guidance, gen_lr,
                  fake_lr, null_prob, clip=1.0, autocast: torch.dtype | None = None):
    """One iteration of the official loop (grad-norm clip ``clip``, officially 1.0; ``autocast``: the
    accelerate mixed-precision forward); returns (loss_vsd, loss_fake, student optimizer, fake optimizer).

    One stated difference: the official code drops the prompt of the *whole* fake batch with p = 0.1;
    we drop it per sample (same expectation, lower variance), so the oracle draws a per-sample mask.
    Random draws in our order: z, t, eps (generator step), then t_f, eps_f, drop mask (fake step).
    """
    n, dtype = cond.embeds.shape[0], cond.embeds.dtype

    def call(model, x, t, c):
        amp = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
        with amp:
            return official_call(family, model, x, t, c)

    def add_noise(x0, noise, t):  # DDPMScheduler.add_noise
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        return ab ** 0.5 * x0 + (1 - ab) ** 0.5 * noise

    opt_s = torch.optim.AdamW(thetas(student).values(), lr=gen_lr, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    opt_f = torch.optim.AdamW(thetas(fake).values(), lr=fake_lr, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)

    # Generator (predict_original): the student at t = 999, x0 with the hard-coded 0.0047.
    z = torch.randn(shape, generator=gen).to(dtype)
    alpha_T, sigma_T = OFFICIAL_A ** 0.5, (1 - OFFICIAL_A) ** 0.5
    up = torch.promote_types(dtype, torch.float32)  # the official .float(): upcast, never down from float64
    x0 = (z.to(up) - sigma_T * call(student, z, torch.full((n,), 999), cond).to(up)) / alpha_T
    t = torch.randint(20, 981, (n,), generator=gen)
    noisy = add_noise(x0, torch.randn(shape, generator=gen).to(up), t).to(dtype)
    with torch.no_grad():
        def guided(model):
            e_u, e_c = call(model, noisy, t, null).to(up), call(model, noisy, t, cond).to(up)
            return e_u + guidance * (e_c - e_u)
        real, fk = guided(teacher), guided(fake)
    sigma_t = ((1 - alphas_cumprod[t]) ** 0.5).view(-1, 1, 1, 1)
    g = torch.nan_to_num(sigma_t ** 2 * (real - fk))
    loss_vsd = 0.5 * F.mse_loss(x0.to(up), (x0 - g).detach().to(up))
    loss_vsd.backward()
    torch.nn.utils.clip_grad_norm_(list(thetas(student).values()), clip)
    opt_s.step()

    # Fake score: denoising on the detached sample, per-sample weight sqrt(abar_t).
    t_f = torch.randint(0, 1000, (n,), generator=gen)
    noise = torch.randn(shape, generator=gen).to(up)
    noisy = add_noise(x0.detach(), noise, t_f).to(dtype)
    drop = torch.rand(n, generator=gen) < null_prob
    c = type(cond)(torch.where(drop.view(-1, 1, 1), null.embeds, cond.embeds),
                   None if cond.mask is None else torch.where(drop.view(-1, 1), null.mask, cond.mask))
    alpha_t = (alphas_cumprod[t_f] ** 0.5).view(-1, 1, 1, 1)
    loss_fake = F.mse_loss((alpha_t * call(fake, noisy, t_f, c).to(up)), (alpha_t * noise).to(up))
    loss_fake.backward()
    torch.nn.utils.clip_grad_norm_(list(thetas(fake).values()), clip)
    opt_f.step()
    return float(loss_vsd.detach()), float(loss_fake.detach()), opt_s, opt_f
