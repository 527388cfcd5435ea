"""``vsd.optimizer=adamw_8bit``: bitsandbytes' AdamW8bit (the official ``--use_8bit_adam``) for the
adapters, in the plain-torch updater and as DeepSpeed's client optimizer (ZeRO-2); an optional
dependency, so without it the option fails with an error that says what to install."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import deepspeed_engines, deepspeed_world_of_one
from wadi_core.models import load_teacher
from wadi_core.models.tiny import save_tiny_pipeline
from wadi_core.vsd import AdapterSpec, TorchUpdater, VSDConfig, WaDiDistiller, make_updaters, vsd_step
from wadi_core.vsd.optim import make_optimizer, optimizer_state_bytes

PROMPTS = ["a red circle", "a small blue square on the left"]


def test_missing_bitsandbytes_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(ImportError, match=r"needs bitsandbytes.*pip install"):
        make_optimizer([torch.nn.Parameter(torch.zeros(4))], "adamw_8bit", 1e-3)
    with pytest.raises(ValueError, match="optimizer must be 'adamw' or 'adamw_8bit'"):
        VSDConfig(optimizer="sgd")


def test_adamw_8bit_steps_like_adamw_with_a_quarter_of_the_state():
    """One step on a 64 x 256 tensor: 8-bit moments (uint8, 2 bytes per parameter plus one fp32 scale per
    256 values) against torch AdamW's 8 bytes; the update within 2 % of lr of AdamW's (the first step is
    ~lr * sign(grad), so the quantisation barely shows in it)."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    grad = torch.randn(64, 256)
    params, states, steps = {}, {}, {}
    for name in ("adamw", "adamw_8bit"):
        p = torch.nn.Parameter(torch.zeros(64, 256))
        opt = make_optimizer([p], name, lr=1e-2)
        p.grad = grad.clone()
        opt.step()
        params[name], states[name], steps[name] = p, opt, p.detach().clone()
    moments = [v for v in states["adamw_8bit"].state[params["adamw_8bit"]].values() if torch.is_tensor(v)
               and v.shape == grad.shape]
    assert len(moments) == 2 and all(m.dtype == torch.uint8 for m in moments)
    assert optimizer_state_bytes(states["adamw"]) == 64 * 256 * 8 + 4  # two fp32 moments (+ the step count)
    assert optimizer_state_bytes(states["adamw_8bit"]) < 0.27 * optimizer_state_bytes(states["adamw"])
    torch.testing.assert_close(steps["adamw_8bit"], steps["adamw"], rtol=0, atol=2e-2 * 1e-2)
    assert steps["adamw"].abs().min() > 0.5e-2  # both moved every element


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"), "sd", seed=0)


def _distiller(sd_dir, **kw) -> WaDiDistiller:
    torch.manual_seed(0)
    return WaDiDistiller(load_teacher(sd_dir), VSDConfig(student=AdapterSpec("lorad", 4), fake=AdapterSpec("lorad", 2),
                                                         gen_lr=1e-3, fake_lr=1e-2, optimizer="adamw_8bit", **kw))


def test_local_updaters_take_the_8bit_optimizer(sd_dir):
    bnb = pytest.importorskip("bitsandbytes")
    d = _distiller(sd_dir)
    ups = make_updaters(d)
    assert all(isinstance(u.optimizer, bnb.optim.AdamW8bit) for u in ups.values())
    before = [p.detach().clone() for p in d.parameters("fake")]
    with torch.no_grad():  # fake != teacher, so the student gets a gradient too
        for p in d.parameters("fake"):
            p.add_(0.1 * torch.randn_like(p))
    m = vsd_step(d, d.teacher.encode_prompts(PROMPTS), ups["student"], ups["fake"], torch.Generator().manual_seed(0))
    assert m["skipped_nonfinite"] == 0.0 and m["grad_norm_student"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, d.parameters("fake")))
    assert isinstance(ups["fake"], TorchUpdater) and ups["fake"].optimizer.state


def test_deepspeed_zero2_takes_the_8bit_optimizer_as_client_optimizer(sd_dir):
    """DeepSpeed hands the 8-bit AdamW its flat fp32 partitions; the step applies, the state is uint8."""
    bnb = pytest.importorskip("bitsandbytes")
    pytest.importorskip("deepspeed")
    from pipelines.train.engines import DeepSpeedUpdater

    d = _distiller(sd_dir)
    with deepspeed_world_of_one():
        engines = deepspeed_engines(d, len(PROMPTS))
        ups = {r: DeepSpeedUpdater(e) for r, e in engines.items()}
        before = [p.detach().clone() for p in d.parameters("fake")]
        m = vsd_step(d, d.teacher.encode_prompts(PROMPTS), ups["student"], ups["fake"],
                     torch.Generator().manual_seed(0))
        assert m["skipped_nonfinite"] == 0.0
        assert any(not torch.equal(a, b) for a, b in zip(before, d.parameters("fake")))
        inner = engines["fake"].optimizer.optimizer
        assert isinstance(inner, bnb.optim.AdamW8bit)
        dtypes = {v.dtype for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 256}
        assert torch.uint8 in dtypes
