"""The VSD / DMD2 maths on hand-made tensors (the WaDi paper's VSD step; docs/ARCHITECTURE.md)."""

from __future__ import annotations

import math

import pytest
import torch

from wadi_core.config import ConfigError, from_dict, to_flat_dict
from wadi_core.vsd import (AdapterSpec, VSDConfig, add_noise, cfg_combine, dmd2_gradient, fake_score_loss,
                           generator_loss, vsd_gradient, x0_from_eps)


def _sd_abar() -> torch.Tensor:
    """SD's scaled-linear alphabar, computed here independently of diffusers."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def test_sd_schedule_alphabar_999_is_the_papers_value():
    assert _sd_abar()[999].item() == pytest.approx(0.0047, abs=5e-5)


def test_generator_loss_gradient_wrt_x0_is_g_over_numel():
    torch.manual_seed(0)
    x0 = torch.randn(3, 4, 5, 6, requires_grad=True)
    g = torch.randn(3, 4, 5, 6)
    generator_loss(x0, g).backward()
    torch.testing.assert_close(x0.grad, g / g.numel(), rtol=1e-6, atol=1e-9)


def test_generator_loss_does_not_backpropagate_into_g():
    x0 = torch.randn(2, 4, 3, 3, requires_grad=True)
    g_src = torch.randn(2, 4, 3, 3, requires_grad=True)
    generator_loss(x0, g_src * 2).backward()
    assert g_src.grad is None


def test_x0_from_eps_matches_the_closed_form():
    abar = _sd_abar()
    t = torch.tensor([999, 500, 20, 0])
    x0 = torch.randn(4, 4, 8, 8, dtype=torch.float64)
    eps = torch.randn(4, 4, 8, 8, dtype=torch.float64)
    a = abar[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps  # forward process, by hand
    torch.testing.assert_close(add_noise(x0, eps, abar[t]), x_t)
    torch.testing.assert_close(x0_from_eps(x_t.float(), eps.float(), abar[t].float()), x0.float(),
                               rtol=1e-4, atol=2e-4)
    # The one-step generator at t = 999: x0 = (z - sqrt(1 - 0.0047) eps) / sqrt(0.0047)
    z, e = torch.tensor([[[[1.0]]]]), torch.tensor([[[[0.5]]]])
    expected = (1.0 - math.sqrt(1 - abar[999].item()) * 0.5) / math.sqrt(abar[999].item())
    assert x0_from_eps(z, e, abar[999:].float()).item() == pytest.approx(expected, rel=1e-5)


def test_cfg_combines_as_written():
    e_u = torch.tensor([1.0, -2.0, 0.5])
    e_c = torch.tensor([3.0, 2.0, 0.5])
    torch.testing.assert_close(cfg_combine(e_u, e_c, 1.5), torch.tensor([4.0, 4.0, 0.5]))
    torch.testing.assert_close(cfg_combine(e_u, e_c, 1.0), e_c)
    torch.testing.assert_close(cfg_combine(e_u, e_c, 0.0), e_u)


def test_guidance_interval_is_the_scale_up_to_t_max_and_one_above():
    from wadi_core.vsd.losses import guidance_in_interval

    t = torch.tensor([20, 600, 601, 980])
    assert guidance_in_interval(3.0, t, 999) == 3.0  # every sample inside: the plain number
    assert guidance_in_interval(1.0, t, 100) == 1.0
    torch.testing.assert_close(guidance_in_interval(3.0, t, 600), torch.tensor([3.0, 3.0, 1.0, 1.0]))


def test_vsd_gradient_is_sigma_squared_weighted_score_gap_without_nans():
    abar_t = torch.tensor([0.25, 0.9])
    e_real = torch.ones(2, 1, 2, 2)
    e_fake = torch.zeros(2, 1, 2, 2)
    e_real[1, 0, 0, 0] = float("nan")
    g = vsd_gradient(e_real, e_fake, abar_t)
    assert torch.isfinite(g).all()
    assert g[0].eq(0.75).all()
    assert g[1, 0, 0, 0] == 0 and g[1, 0, 1, 1] == pytest.approx(0.1)


def test_dmd2_gradient_matches_its_formula():
    torch.manual_seed(1)
    abar_t = torch.tensor([0.3, 0.05])
    x0, x_t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    e_real, e_fake = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    g = dmd2_gradient(x0, x_t, e_real, e_fake, abar_t)
    for i in range(2):  # per sample, written out
        a = abar_t[i].item()
        pred_real = (x_t[i] - math.sqrt(1 - a) * e_real[i]) / math.sqrt(a)
        pred_fake = (x_t[i] - math.sqrt(1 - a) * e_fake[i]) / math.sqrt(a)
        p_real, p_fake = x0[i] - pred_real, x0[i] - pred_fake
        torch.testing.assert_close(g[i], (p_real - p_fake) / p_real.abs().mean(), rtol=1e-5, atol=1e-6)
        # Same direction as VSD's score gap: p_real - p_fake = sigma/alpha (e_real - e_fake).
        gap = math.sqrt(1 - a) / math.sqrt(a) * (e_real[i] - e_fake[i])
        torch.testing.assert_close(p_real - p_fake, gap, rtol=1e-4, atol=1e-5)


def test_fake_score_loss_weights_each_sample_by_alphabar_not_its_square():
    # Official update: mse(sqrt(abar) e_fake, sqrt(abar) eps), i.e. weight abar per squared error.
    abar_t = torch.tensor([0.5, 0.1])
    e_pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(2, 1, 1, 2)
    eps = torch.zeros(2, 1, 1, 2)
    expected = (0.5 * 1 ** 2 + 0.5 * 2 ** 2 + 0.1 * 3 ** 2 + 0.1 * 4 ** 2) / 4
    assert fake_score_loss(e_pred, eps, abar_t).item() == pytest.approx(expected)


def test_config_defaults_flatten_and_round_trip():
    cfg = VSDConfig()
    flat = to_flat_dict(cfg)
    assert flat["guidance_real"] == 1.5 and flat["fake_lr"] == 1e-2 and flat["student.rank"] == 256
    assert flat["fake.rank"] == 32 and flat["dmd2.guidance_real"] == 1.75 and flat["t_max"] == 980
    assert from_dict(VSDConfig, flat) == cfg
    assert VSDConfig(loss="dmd2").effective_guidance == (1.75, 1.0)
    assert cfg.effective_guidance == (1.5, 1.5)
    assert AdapterSpec().resolved_targets("sd", "fake") == "unet_fake"
    assert AdapterSpec().resolved_targets("pixart", "student") == "dit_student"


@pytest.mark.parametrize("bad, match", [
    ({"loss": "sid"}, r"loss: 'sid' is not one of \['vsd', 'dmd2'\]"),
    ({"t_min": 990}, r"need 0 <= t_min <= t_max, got t_min=990"),
    ({"null_prob": 2.0}, r"null_prob must be in \[0, 1\], got 2.0"),
    ({"fake_steps_per_gen": 0}, r"fake_steps_per_gen must be >= 1, got 0"),
    ({"student.rank": 0}, r"student: a lorad adapter needs rank >= 1, got 0"),
    ({"guidance": 2.0}, r"unknown config key\(s\) \['guidance'\]"),
])
def test_config_rejects_bad_values_clearly(bad, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(VSDConfig, bad)
