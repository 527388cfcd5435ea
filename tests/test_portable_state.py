"""World-size-independent checkpoints (pipelines/train/portable_state.py): a state written by 4 ZeRO-2
ranks loads at 2, 8 and 1 (ZeRO-0) with parameters, Adam moments and step count bit-equal, and the
next step from it matches the next step at the old world size. Real DeepSpeed engines in gloo process
groups, one process per rank."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from conftest import deepspeed_rank, deepspeed_world_of_one, free_port
from torch import nn

from wadi_core.vsd.config import VSDConfig

from pipelines.config.job import TrainConfig
from pipelines.train.engines import build_engine
from pipelines.train.portable_state import (
    FORMAT,
    UnportableOptimizer,
    gather_full_state,
    load_full_state,
    save_full_state,
)

GLOBAL_BATCH = 8
WRITTEN = "written.safetensors"


class _Adapters(nn.Module):
    """A frozen base layer and two trainable ones (odd sizes, so ZeRO partitions split tensors)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.base = nn.Linear(6, 13)
        self.base.requires_grad_(False)
        self.a = nn.Linear(13, 7)
        self.b = nn.Linear(7, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(self.base(x))))


def _global_batch(step: int) -> torch.Tensor:
    return torch.randn(GLOBAL_BATCH, 6, generator=torch.Generator().manual_seed(100 + step))


def _engine(world: int, zero: int):
    train = TrainConfig(global_batch=GLOBAL_BATCH, num_workers=world, zero_stage=zero)
    return build_engine(_Adapters(), 1e-2, train, VSDConfig())


def _train(engine, rank: int, world: int, steps: range) -> None:
    per = GLOBAL_BATCH // world
    for step in steps:  # each rank its slice of the same global batch: the mean of means is the global mean
        x = _global_batch(step)[rank * per:(rank + 1) * per]
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()


def _rank_main(rank: int, world: int, port: int, zero: int, action: str, workdir: str) -> None:
    """One rank: 'write' trains 3 steps and saves; 'load' loads and saves what it gathers back;
    'load_step' also takes step 3 then and saves again."""
    with deepspeed_rank(rank, world, port):
        engine = _engine(world, zero)
        work = Path(workdir)
        if action == "write":
            _train(engine, rank, world, range(3))
            save_full_state(engine, work / WRITTEN, rank)
            return
        assert load_full_state(engine, work / WRITTEN) == 3
        save_full_state(engine, work / f"load_world{world}_zero{zero}.safetensors", rank)
        if action == "load_step":
            _train(engine, rank, world, range(3, 4))
            save_full_state(engine, work / f"load_step_world{world}_zero{zero}.safetensors", rank)


def _run_world(world: int, zero: int, action: str, workdir: Path) -> None:
    mp.start_processes(_rank_main, args=(world, free_port(), zero, action, str(workdir)), nprocs=world,
                       start_method="spawn", join=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_state_written_at_world_4_resumes_at_2_8_and_1(tmp_path):
    _run_world(4, 2, "write", tmp_path)
    written = load_file(str(tmp_path / WRITTEN))
    assert any(k.startswith("exp_avg_sq/") and v.abs().sum() > 0 for k, v in written.items())
    # the next step from the loaded state is the next step of the original run (up to all-reduce order)
    _run_world(4, 2, "load_step", tmp_path)
    _run_world(2, 2, "load_step", tmp_path)
    _run_world(8, 2, "load", tmp_path)
    _run_world(1, 0, "load", tmp_path)
    for world, zero in ((4, 2), (2, 2), (8, 2), (1, 0)):
        back = load_file(str(tmp_path / f"load_world{world}_zero{zero}.safetensors"))
        assert back.keys() == written.keys()
        unequal = [k for k in written if not torch.equal(back[k], written[k])]
        assert not unequal, f"world {world} ZeRO-{zero} changed {unequal[:4]}"

    at4 = load_file(str(tmp_path / "load_step_world4_zero2.safetensors"))
    at2 = load_file(str(tmp_path / "load_step_world2_zero2.safetensors"))
    for k in at4:
        assert not torch.equal(at4[k], written[k]), f"{k} did not move in the step"
        torch.testing.assert_close(at2[k], at4[k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.fixture
def world_of_one():
    with deepspeed_world_of_one():
        yield


def test_full_state_round_trip_and_refusals(tmp_path, world_of_one):
    engine = _engine(1, 2)
    _train(engine, 0, 1, range(2))
    save_full_state(engine, tmp_path / "s.safetensors", rank=0)
    fresh = _engine(1, 2)  # never stepped: its Adam state does not exist yet
    assert load_full_state(fresh, tmp_path / "s.safetensors") == 2
    got, step = gather_full_state(fresh)
    want = load_file(str(tmp_path / "s.safetensors"))
    assert step == 2 and all(torch.equal(got[k], want[k]) for k in want)

    other = dict(want)
    other["param/c.weight"] = other.pop("param/b.weight")
    save_file(other, str(tmp_path / "other.safetensors"), metadata={"format": FORMAT, "adam_step": "2"})
    with pytest.raises(ValueError, match="does not fit this engine's adapters"):
        load_full_state(_engine(1, 2), tmp_path / "other.safetensors")
    save_file(want, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="is not a full-state file"):
        load_full_state(_engine(1, 2), tmp_path / "plain.safetensors")


def test_eight_bit_optimizer_is_refused_with_the_fix(world_of_one):
    pytest.importorskip("bitsandbytes")
    train = TrainConfig(global_batch=2, num_workers=1, zero_stage=2)
    engine = build_engine(_Adapters(), 1e-2, train, VSDConfig(optimizer="adamw_8bit"))
    _train(engine, 0, 1, range(1))
    with pytest.raises(UnportableOptimizer, match="vsd.optimizer=adamw"):
        gather_full_state(engine)
