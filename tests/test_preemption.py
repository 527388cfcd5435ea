"""The drain-notice rule of the train loop (pipelines.train.preemption.PreemptionWatch.checkpoint_due), at unit
level: a checkpoint at the notice, one more when the deadline is closer than 2 x (checkpoint +
step time) + 1 s, none in between and none after. The multi-node test (tests/test_multinode.py)
holds the notice checkpoint end to end; the second one depends on the clock, so it is held here."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from pipelines.runtime.stop import StopWatch
from pipelines.train import preemption
from pipelines.train.preemption import PreemptionWatch


class _Watch:
    """A :class:`PreemptionWatch` at step 5 whose checkpoints take ``checkpoint_s``."""

    def __init__(self, watch: PreemptionWatch, checkpoint_s: float = 2.0) -> None:
        self.watch, self.checkpoint_s = watch, checkpoint_s

    def due(self, step_seconds: float) -> bool:
        return self.watch.checkpoint_due(5, step_seconds, self.checkpoint_s)


def _run(monkeypatch, info):  # noqa: ANN001, ANN202
    monkeypatch.setattr("ray.train.get_preemption_info", lambda: info["now"])
    monkeypatch.setattr(preemption, "any_rank_true", lambda flag, device: flag)  # one rank
    return _Watch(PreemptionWatch(StopWatch(None), rank=0, world=1, device="cpu"))


def test_no_notice_no_checkpoint(monkeypatch) -> None:  # noqa: ANN001
    run = _run(monkeypatch, {"now": None})
    assert run.due(step_seconds=1.0) is False and run.watch.notice_step is None


def test_a_checkpoint_at_the_notice_and_one_more_before_the_deadline(monkeypatch, capsys) -> None:  # noqa: ANN001
    notice = SimpleNamespace(preempted_node_ids=["n1"], preempted_ranks=[1], deadline_ms=(time.time() + 60) * 1000)
    info = {"now": notice}
    run = _run(monkeypatch, info)
    assert run.due(step_seconds=1.0) is True  # at the notice
    assert run.watch.notice_step == 5 and "drain notice for nodes ['n1']" in capsys.readouterr().out
    # 60 s left, 2 x (2 + 1) + 1 = 7 s needed: go on training
    assert run.due(step_seconds=1.0) is False
    notice.deadline_ms = (time.time() + 6.5) * 1000  # now closer than 7 s
    assert run.due(step_seconds=1.0) is True and run.watch.saved_before_deadline
    assert run.due(step_seconds=1.0) is False  # only once
    notice.deadline_ms = 0  # a notice without a deadline: the notice checkpoint only
    run2 = _run(monkeypatch, info)
    assert run2.due(step_seconds=1.0) is True
    assert run2.due(step_seconds=1.0) is False


@pytest.mark.parametrize("checkpoint_s,step_s,left_s,due", [(2.0, 1.0, 7.5, False), (2.0, 1.0, 6.9, True),
                                                             (10.0, 5.0, 30.0, True), (0.1, 0.1, 2.0, False)])
def test_the_deadline_margin_scales_with_checkpoint_and_step_time(monkeypatch, checkpoint_s, step_s, left_s,
                                                                  due) -> None:  # noqa: ANN001
    notice = SimpleNamespace(preempted_node_ids=["n"], preempted_ranks=[0], deadline_ms=0)
    run = _run(monkeypatch, {"now": notice})
    run.checkpoint_s = checkpoint_s
    run.due(step_seconds=step_s)  # the notice itself
    notice.deadline_ms = (time.time() + left_s) * 1000
    assert run.due(step_seconds=step_s) is due


class _StopFlag:
    """A stop watch whose answer the test sets."""

    def __init__(self, stop: bool) -> None:
        self.stop = stop

    def requested(self) -> bool:
        return self.stop


@pytest.mark.parametrize("rank,stop,has_batch,go_on", [(0, False, True, True), (0, False, False, False),
                                                      (0, True, True, False), (1, True, True, True)])
def test_a_stop_seen_by_rank_0_ends_the_run_for_every_rank(monkeypatch, rank, stop, has_batch, go_on) -> None:  # noqa: ANN001
    """One collective per step carries rank 0's stop flag (other ranks do not poll it) and whether
    every rank has a batch; a stop marks the watch ``stop_requested``."""
    summed = []
    monkeypatch.setattr(preemption, "sum_over_ranks", lambda values, device: summed.append(values) or values)
    watch = PreemptionWatch(_StopFlag(stop), rank=rank, world=1, device="cpu")
    assert watch.go_on(has_batch) is go_on
    assert watch.stop_requested is (stop and rank == 0) and len(summed) == 1
