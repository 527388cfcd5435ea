"""The student EMA: averages, swaps in and out exactly, resumes, and is what the export holds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wadi_core.vsd.ema import AdapterEMA


def test_ema_follows_the_warmed_up_average_and_swaps_back_exactly():
    p = nn.Parameter(torch.zeros(3))
    ema = AdapterEMA([p], decay=0.9)
    expected = torch.zeros(3)
    for t in range(1, 30):
        with torch.no_grad():
            p.fill_(float(t))
        ema.update()
        d = min(0.9, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * float(t)
    torch.testing.assert_close(ema.shadow[0], expected)
    live = p.detach().clone()
    with ema.applied():
        torch.testing.assert_close(p.detach(), expected)
    assert torch.equal(p.detach(), live)  # swapped back bit for bit
    with pytest.raises(ValueError, match="decay"):
        AdapterEMA([p], decay=1.0)


def test_ema_state_round_trips_and_refuses_another_layout():
    p = nn.Parameter(torch.randn(4))
    ema = AdapterEMA([p], 0.99)
    for _ in range(5):
        with torch.no_grad():
            p.add_(1.0)
        ema.update()
    other = AdapterEMA([nn.Parameter(torch.zeros(4))], 0.99)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 5 and torch.equal(other.shadow[0], ema.shadow[0])
    with pytest.raises(ValueError, match="does not match"):
        AdapterEMA([p, nn.Parameter(torch.zeros(2))], 0.99).load_state_dict(ema.state_dict())


def test_train_local_exports_the_averaged_student_and_resumes_its_ema(tmp_path):
    from wadi_core.adapters import adapter_state_dict
    from wadi_core.adapters import load_adapter_file
    from wadi_core.models.tiny import save_tiny_pipeline
    from wadi_core.local_train import LocalTrainConfig, train_local
    from wadi_core.vsd import AdapterSpec, VSDConfig

    src = save_tiny_pipeline(tmp_path / "teacher", "sd")
    vsd = VSDConfig(student=AdapterSpec("lorad", 4), fake=AdapterSpec("lorad", 2), gen_lr=1e-2, student_ema=0.9)
    cfg = LocalTrainConfig(teacher=str(src), vsd=vsd, steps=4, batch_size=2, sample_every=0, num_sample_prompts=2,
                           out_dir=str(tmp_path / "run"), prompts="domain", export_live=True)
    res = train_local(cfg, progress=False)
    live = adapter_state_dict(res["distiller"].denoiser, "student")
    exported, _ = load_adapter_file(tmp_path / "run" / "export" / "adapters" / "student.safetensors")
    exported_live, _ = load_adapter_file(tmp_path / "run" / "export_live" / "adapters" / "student.safetensors")
    assert all(torch.equal(exported_live[k], v) for k, v in live.items())
    assert any(not torch.allclose(exported[k], v) for k, v in live.items())  # the average, not the live weights
    # Resume two more steps: the EMA continues from its saved state (6 updates), not from scratch.
    res2 = train_local(LocalTrainConfig(**{**cfg.__dict__, "steps": 6}), progress=False)
    from wadi_core.vsd import TrainState

    state = TrainState.load(tmp_path / "run" / "state")
    assert res2["step"] == 6 and int(state.optimizers["student_ema"]["updates"]) == 6
