"""The drain-notice rule of the train loop (pipelines.train.worker._Run.preemption_checkpoint_due), at unit
level: a checkpoint at the notice, one more when the deadline is closer than 2 x (checkpoint +
step time) + 1 s, none in between and none after. The multi-node test (tests/test_multinode.py)
holds the notice checkpoint end to end; the second one depends on the clock, so it is held here."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest


def _run(monkeypatch, info):  # noqa: ANN001, ANN202
    import pipelines.train.worker as train

    monkeypatch.setattr("ray.train.get_preemption_info", lambda: info["now"])
    monkeypatch.setattr(train, "_any_rank_true", lambda flag, device: flag)  # one rank
    run = train._Run.__new__(train._Run)
    run.state = SimpleNamespace(step=5)
    run.rank, run.device = 0, "cpu"
    run.notice_step, run.saved_before_deadline, run.checkpoint_seconds = None, False, 2.0
    return run


def test_no_notice_no_checkpoint(monkeypatch) -> None:  # noqa: ANN001
    run = _run(monkeypatch, {"now": None})
    assert run.preemption_checkpoint_due(step_seconds=1.0) is False and run.notice_step is None


def test_a_checkpoint_at_the_notice_and_one_more_before_the_deadline(monkeypatch, capsys) -> None:  # noqa: ANN001
    notice = SimpleNamespace(preempted_node_ids=["n1"], preempted_ranks=[1], deadline_ms=(time.time() + 60) * 1000)
    info = {"now": notice}
    run = _run(monkeypatch, info)
    assert run.preemption_checkpoint_due(step_seconds=1.0) is True  # at the notice
    assert run.notice_step == 5 and "drain notice for nodes ['n1']" in capsys.readouterr().out
    # 60 s left, 2 x (2 + 1) + 1 = 7 s needed: go on training
    assert run.preemption_checkpoint_due(step_seconds=1.0) is False
    notice.deadline_ms = (time.time() + 6.5) * 1000  # now closer than 7 s
    assert run.preemption_checkpoint_due(step_seconds=1.0) is True and run.saved_before_deadline
    assert run.preemption_checkpoint_due(step_seconds=1.0) is False  # only once
    notice.deadline_ms = 0  # a notice without a deadline: the notice checkpoint only
    run2 = _run(monkeypatch, info)
    assert run2.preemption_checkpoint_due(step_seconds=1.0) is True
    assert run2.preemption_checkpoint_due(step_seconds=1.0) is False


@pytest.mark.parametrize("checkpoint_s,step_s,left_s,due", [(2.0, 1.0, 7.5, False), (2.0, 1.0, 6.9, True),
                                                             (10.0, 5.0, 30.0, True), (0.1, 0.1, 2.0, False)])
def test_the_deadline_margin_scales_with_checkpoint_and_step_time(monkeypatch, checkpoint_s, step_s, left_s,
                                                                  due) -> None:  # noqa: ANN001
    notice = SimpleNamespace(preempted_node_ids=["n"], preempted_ranks=[0], deadline_ms=0)
    run = _run(monkeypatch, {"now": notice})
    run.checkpoint_seconds = checkpoint_s
    run.preemption_checkpoint_due(step_seconds=step_s)  # the notice itself
    notice.deadline_ms = (time.time() + left_s) * 1000
    assert run.preemption_checkpoint_due(step_seconds=step_s) is due
