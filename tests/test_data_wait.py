"""The trainer's data-wait metric (#35): ``perf/data_wait_s`` is the time a step waited for its batch
(``Trainer.next_batch``), ``perf/data_wait_share`` that wait over the step's wall time. Driven through
the real ``Trainer.train_epochs`` loop and ``Trainer.log_step`` with faked data and steps: no Ray, no model."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from pipelines.train import worker as train


class _Stream:
    bad: dict[str, int] = {}
    remainder = 0

    def batches(self, shard: Any, skip: int = 0) -> Iterator[list[str]]:
        yield from ([f"prompt {i}"] for i in range(shard))


class _Tracker:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((step, metrics))


def _fake_trainer(wait_s: float, compute_s: float) -> train.Trainer:
    """A :class:`Trainer` whose data, step and epochs are faked; its loop and ``log_step`` are the real ones."""
    run = train.Trainer.__new__(train.Trainer)
    run.rank, run.world, run.data_wait_share_job = 1, 2, 0.0  # not rank 0: no progress lines
    run.tracker = _Tracker()
    run.preemption = SimpleNamespace(stop_requested=False, checkpoint_due=lambda *args: False)
    run.checkpointer = SimpleNamespace(seconds=0.0)
    run.loop_config = {"total_steps": None}
    run.state = SimpleNamespace(step=0, epoch=0, nonfinite_steps=0, prompts_seen=0, data_position=0)
    run.cfg = SimpleNamespace(
        data=SimpleNamespace(max_steps=4),
        train=SimpleNamespace(max_nonfinite_in_a_row=3, log_every=1, checkpoint_every=0, global_batch=1),
        tracking=SimpleNamespace(sample_every=0))

    def next_batch(batches: Iterator[Any]) -> Any:
        time.sleep(wait_s)  # a prompt stream that keeps the step waiting
        return next(batches, None)

    def step(batch: Any) -> dict[str, float]:
        time.sleep(compute_s)
        run.state.step += 1
        run.state.data_position += 1  # as the real step: global batches of this epoch trained
        return {"loss_gen": 1.0}

    run.stream, run.next_batch, run.step = _Stream, next_batch, step
    run.bad_counts = lambda stream: {}
    run.epochs = lambda: iter([(0, 10, 0)])  # one epoch of 10 batches
    return run


def _logged_perf(run: train.Trainer) -> list[dict[str, float]]:
    metrics, _ = run.train_epochs()
    tracker = run.tracker
    assert [step for step, _ in tracker.logged] == [1, 2, 3, 4]  # data.max_steps=4, logged every step
    # The job's share in the closing report: steps 2-4 (the epoch's first step is the pipeline starting).
    later = [m for step, m in tracker.logged if step > 1]
    assert run.data_wait_share_job == pytest.approx(
        sum(m["perf/data_wait_s"] for m in later) / sum(m["perf/step_seconds"] for m in later), rel=0.05)
    return [m for _, m in tracker.logged]


def test_data_wait_is_the_time_a_step_waits_for_its_batch() -> None:
    for m in _logged_perf(_fake_trainer(wait_s=0.2, compute_s=0.02)):
        assert 0.2 <= m["perf/data_wait_s"] <= m["perf/step_seconds"]
        assert m["perf/data_wait_share"] == pytest.approx(m["perf/data_wait_s"] / m["perf/step_seconds"])
        assert m["perf/data_wait_share"] > 0.5  # the stream, not the step, is the bottleneck


def test_a_step_that_never_waits_has_a_small_share() -> None:
    for m in _logged_perf(_fake_trainer(wait_s=0.0, compute_s=0.2)):
        assert 0.0 <= m["perf/data_wait_s"] < 0.1 and m["perf/step_seconds"] >= 0.2
        assert 0.0 <= m["perf/data_wait_share"] < 0.5


# -- what the data wait rests on: a shard from S3 is one HEAD and one GET, bounded ------------------


def test_an_s3_shard_is_read_in_one_get_and_never_past_the_bound(s3_server, s3_bucket: str) -> None:  # noqa: ANN001
    """``open_input_stream(...).read()`` read S3 in 256 KiB ranged GETs (~80 requests per 20 MB
    shard, the S3 half of #35's regression); now one HEAD + one GET, at most ``max_bytes + 1``."""
    import os

    import pyarrow as pa

    from s3_fault_proxy import FaultProxy

    from pipelines.data.prompts import read_shard, pyarrow_filesystem, read_shard_batch
    from wadi_core.prompts.shards import bad_code
    from wadi_core import storage

    body = os.urandom(3 << 20)  # 12 chunks of the old reader
    storage.write_bytes(f"s3://{s3_bucket}/lake/big.bin", body)
    with FaultProxy(s3_server) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
        try:
            fs, root = pyarrow_filesystem(f"s3://{s3_bucket}/lake")
            before = proxy.requests
            assert read_shard(fs, f"{root}/big.bin") == body
            assert proxy.requests - before == 2
            assert read_shard(fs, f"{root}/big.bin", max_bytes=1000) == body[:1001]  # bounded
            out = read_shard_batch(pa.table({"path": [f"{root}/big.bin"]}), uri=f"s3://{s3_bucket}/lake",
                                   max_shard_bytes=1000)
        finally:
            os.environ["AWS_ENDPOINT_URL"] = s3_server
    assert out.column("bad").to_pylist() == [bad_code("corrupt_shard")]


@pytest.mark.parametrize(("elapsed_s", "said"), [(2.0, "| 2.00 steps/s |"), (800.0, "| 200 s/step |")])
def test_progress_line_reads_for_fast_and_slow_steps(elapsed_s: float, said: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A full-size step takes minutes on a CPU: the line says seconds per step, not "0.00 steps/s"."""
    progress = train.Progress(total=4, start=0, active=True)
    progress.t0 = time.perf_counter() - elapsed_s  # 4 steps took elapsed_s
    progress.update(4, {"loss_gen": 0.5, "loss_fake": 0.25}, (0.01, elapsed_s / 4))
    line = capsys.readouterr().out
    assert line.startswith("[wadi] step 4/4 | loss_gen 0.5 | loss_fake 0.25") and said in line, line
