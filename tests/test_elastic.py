"""Elastic training (``train.min_workers``): the global batch kept at every world size, one global
prompt order sliced by rank with the position counted in global batches, and VSD draws keyed by
global sample index so that world 2 and world 3 train the same global loss sequence. The Ray
cluster tests (a node lost and returning) are in tests/test_multinode.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from wadi_core.config import ConfigError

from pipelines.config.job import load_config
from pipelines.data.prompts import PromptStream

from conftest import BlockShard, free_port

PROMPTS = ["a red circle", "a small blue square on the left", "a green triangle at the top", "two yellow dots",
           "a purple star in the middle", "an orange ring on the right"]


# -- the global batch at every world size ------------------------------------------------------------------------------

def test_min_workers_turns_on_elastic_and_keeps_the_global_batch() -> None:
    cfg = load_config("embedded", {"train.global_batch": 12, "train.num_workers": 4, "train.min_workers": 2})
    assert cfg.train.elastic and list(cfg.train.world_sizes) == [2, 3, 4]
    shares = {w: [cfg.train.rank_slice(r, w) for r in range(w)] for w in (2, 3, 4)}
    assert shares[2] == [(0, 6), (6, 12)] and shares[4] == [(0, 3), (3, 6), (6, 9), (9, 12)]
    sd15 = load_config("embedded", {"train.global_batch": 128, "train.num_workers": 16, "train.min_workers": 8})
    for w in sd15.train.world_sizes:  # any world size keeps the global batch: shares differ by at most one
        sizes = [b - a for a, b in (sd15.train.rank_slice(r, w) for r in range(w))]
        assert sum(sizes) == 128 and max(sizes) - min(sizes) <= 1
    fixed = load_config("embedded", {"train.global_batch": 12, "train.num_workers": 4})
    assert not fixed.train.elastic and list(fixed.train.world_sizes) == [4]  # default: today's fixed size
    with pytest.raises(ValueError, match="outside train.min_workers"):
        cfg.train.rank_slice(0, 5)


@pytest.mark.parametrize("overrides,message", [
    ({"train.global_batch": 8, "train.num_workers": 4, "train.min_workers": 5}, "must be between 0"),
    ({"train.global_batch": 12, "train.num_workers": 4, "train.min_workers": 2, "train.zero_stage": 3},
     "needs train.zero_stage <= 2"),
    ({"train.global_batch": 12, "train.num_workers": 4, "train.min_workers": 2, "vsd.optimizer": "adamw_8bit"},
     "vsd.optimizer=adamw"),
    ({"train.global_batch": 12, "train.num_workers": 4, "train.min_workers": 2, "data.text_encoding": "actors"},
     "data.text_encoding=trainer"),
])
def test_elastic_configs_that_cannot_be_kept_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("embedded", overrides)


# -- one global order, sliced by rank ------------------------------------------------------------------------------------

def _epoch(world: int, global_batch: int, shard: BlockShard, skip: int = 0,
           stop_after: int | None = None) -> tuple[list[list[list[str]]], list[PromptStream]]:
    """Each rank's slices of the global batches (``stop_after``: the ranks stop together after that
    many, as a lost node stops them)."""
    streams = [PromptStream(global_batch, r, world, replicated=True) for r in range(world)]
    out = []
    for stream in streams:
        batches = stream.batches(shard, skip=skip)
        out.append([b for _, b in zip(range(stop_after if stop_after is not None else 10**9), batches)])
    return out, streams


def test_every_prompt_once_per_epoch_across_a_resize() -> None:
    """World 4 (shares of 1, 2, 1, 2 prompts) trains 4 global batches and loses ranks; world 2 resumes at global batch 4 (the
    position in global batches) and finishes the epoch: each prompt is trained exactly once, the
    global batches are those a fixed world-6 run trains, and each bad row is counted once."""
    captions = [f"p{i}" for i in range(70)]
    rows = list(captions)
    rows.insert(10, "")
    rows.insert(40, "")
    shard = BlockShard([rows[i:i + 9] for i in range(0, len(rows), 9)])  # blocks unrelated to batches
    before, _ = _epoch(4, 6, shard, stop_after=4)
    after, streams = _epoch(2, 6, shard, skip=4)
    trained = [p for rank in before + after for batch in rank for p in batch]
    assert len(trained) == len(set(trained)) == 66 and set(trained) == set(captions[:66])
    assert streams[0].remainder == 4 and all(s.remainder == 4 for s in streams)  # the last 4: no full batch
    reference, _ = _epoch(6, 6, shard)
    resized = [sum((rank[g] for rank in before), []) for g in range(4)] + \
              [sum((rank[g] for rank in after), []) for g in range(len(after[0]))]
    assert resized == [sum((rank[g] for rank in reference), []) for g in range(len(reference[0]))]
    bad = [s.counters()["empty_caption"] for s in streams]
    assert bad == [2, 0]  # rank 0 counts the epoch's bad rows; the others read them too but do not count


# -- noise independent of the world size: the same global loss at world 2 and 3 ----------------------------------------

GLOBAL_BATCH, STEPS = 7, 3  # 7: world 2 and 3 split it unevenly (3 + 4, 2 + 2 + 3)


def _rank_main(rank: int, world: int, port: int, teacher: str, out: str, keyed: bool = True) -> None:
    """One rank of a data-parallel VSD run on the tiny teacher: DeepSpeed ZeRO-2 engines, this rank's
    slice of each global batch, draws keyed by global sample index (``keyed=False``: a generator per
    rank, as before elastic training), the global loss all-reduced."""
    from conftest import deepspeed_rank
    from wadi_core.models import load_teacher
    from wadi_core.vsd import AdapterSpec, VSDConfig, WaDiDistiller, vsd_step
    from wadi_core.vsd.draws import slice_draws

    from pipelines.config.job import TrainConfig
    from pipelines.runtime.collectives import weighted_mean_over_ranks
    from pipelines.train.engines import DeepSpeedUpdater, build_engine

    with deepspeed_rank(rank, world, port):
        torch.manual_seed(0)  # the same adapter init on every rank, as the trainer does
        d = WaDiDistiller(load_teacher(teacher), VSDConfig(student=AdapterSpec("lorad", 4), fake=AdapterSpec("lorad", 2),
                                                           gen_lr=1e-3, fake_lr=1e-2))
        train = TrainConfig(global_batch=GLOBAL_BATCH, num_workers=3, min_workers=2, zero_stage=2)
        start, stop = train.rank_slice(rank, world)
        weight = (stop - start) * world / GLOBAL_BATCH  # as the trainer weighs an uneven share
        ups = {r: DeepSpeedUpdater(build_engine(d.modules(r), lr, train, d.cfg, world), loss_weight=weight)
               for r, lr in (("student", 1e-3), ("fake", 1e-2))}
        losses, generator = [], torch.Generator().manual_seed(1000 + rank)
        for step in range(STEPS):
            prompts = [PROMPTS[(step * GLOBAL_BATCH + i) % len(PROMPTS)] for i in range(GLOBAL_BATCH)]
            cond = d.teacher.encode_prompts(prompts[start:stop])
            draws = slice_draws(7, 0, step, GLOBAL_BATCH, start, stop) if keyed else generator
            m = vsd_step(d, cond, ups["student"], ups["fake"], draws)
            losses.append(weighted_mean_over_ranks([m["loss_gen"], m["loss_fake"]], stop - start, "cpu"))
        if rank == 0:
            torch.save(torch.tensor(losses, dtype=torch.float64), out)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_world_2_and_world_3_train_the_same_global_loss_sequence(tmp_path: Path) -> None:
    from wadi_core.models.tiny import save_tiny_pipeline

    teacher = str(save_tiny_pipeline(tmp_path / "teacher", "sd", seed=0))
    curves = {}
    for world, keyed in ((2, True), (3, True), (3, False)):
        out = tmp_path / f"losses_{world}_{keyed}.pt"
        mp.spawn(_rank_main, args=(world, free_port(), teacher, str(out), keyed), nprocs=world, join=True)
        curves[world, keyed] = torch.load(out, weights_only=True)
    assert curves[2, True].shape == (STEPS, 2) and torch.isfinite(curves[2, True]).all()
    # Tolerance: loss_fake (a denoising loss) to 1e-5 relative; loss_gen is the VSD surrogate 0.5 |g|^2 / numel
    # with g = e_real - e_fake, a small difference of two near-equal predictions, so float rounding is
    # amplified: 1e-4 of its scale over the run (measured here: 4e-8 and 1.5e-5).
    scale = curves[2, True].abs().amax(dim=0)
    diff = (curves[3, True] - curves[2, True]).abs()
    tolerance = torch.tensor([1e-4, 1e-5], dtype=torch.float64) * scale
    assert (diff <= tolerance).all(), f"{curves[2, True].tolist()} vs {curves[3, True].tolist()}: {(diff / scale).tolist()}"
    # Per-rank generators (the draws of a fixed-size run before) give another sequence at another size.
    assert ((curves[3, False] - curves[2, True]).abs() > 1e-3 * scale).any()
