"""What both trainers do after a step (wadi_core.vsd.bookkeeping): the step counter, the non-finite
guard, the student EMA and the counters in one order, and the one cadence rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wadi_core.vsd import NonFiniteGuard, NonFiniteTraining, TrainState
from wadi_core.vsd.bookkeeping import StepBookkeeper, ema_applied, every
from wadi_core.vsd.ema import AdapterEMA

FINITE = {"loss_gen": 1.0, "skipped_nonfinite": 0.0}
SKIPPED = {"loss_gen": float("nan"), "skipped_nonfinite": 1.0}


def _student() -> tuple[nn.Parameter, AdapterEMA]:
    param = nn.Parameter(torch.zeros(3))
    return param, AdapterEMA([param], decay=0.5)


def test_a_finite_step_advances_every_counter_and_the_average() -> None:
    param, ema = _student()
    state = TrainState(step=7, data_position=2, prompts_seen=64, nonfinite_steps=1)
    keeper = StepBookkeeper(NonFiniteGuard(limit=3, total=1), ema)
    with torch.no_grad():
        param.fill_(2.0)
    keeper.after_step(state, FINITE, consumed=1, prompts=32)
    assert (state.step, state.data_position, state.prompts_seen, state.nonfinite_steps) == (8, 3, 96, 1)
    # warm-up decay min(0.5, 2 / 11): the average moved 9/11 of the way to the new weights
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 2.0 * 9 / 11))


def test_a_nan_step_is_counted_by_the_guard_and_not_averaged_into_the_ema() -> None:
    param, ema = _student()
    state = TrainState()
    keeper = StepBookkeeper(NonFiniteGuard(limit=3), ema)
    keeper.after_step(state, FINITE, consumed=4, prompts=4)
    before = ema.shadow[0].clone()
    with torch.no_grad():
        param.fill_(float("nan"))  # what a skipped step must not leak into the average
    with pytest.warns(UserWarning, match="VSD step 2: a loss or gradient was not finite"):
        keeper.after_step(state, SKIPPED, consumed=4, prompts=4)
    assert (state.step, state.nonfinite_steps, state.data_position, state.prompts_seen) == (2, 1, 8, 8)
    assert ema.updates == 1 and torch.equal(ema.shadow[0], before)


def test_too_many_skipped_steps_in_a_row_stop_after_the_step_is_counted() -> None:
    _, ema = _student()
    state = TrainState(step=10)
    keeper = StepBookkeeper(NonFiniteGuard(limit=2), ema)
    with pytest.warns(UserWarning):
        keeper.after_step(state, SKIPPED, consumed=1, prompts=1)
        with pytest.raises(NonFiniteTraining, match=r"2 VSD steps in a row \(up to step 12\)"):
            keeper.after_step(state, SKIPPED, consumed=1, prompts=1)
    assert state.step == 12 and ema.updates == 0


def test_without_an_ema_the_bookkeeper_and_ema_applied_still_work() -> None:
    state = TrainState()
    StepBookkeeper(NonFiniteGuard(limit=0), None).after_step(state, FINITE, consumed=1, prompts=2)
    assert (state.step, state.prompts_seen) == (1, 2)
    with ema_applied(None):
        pass


def test_ema_applied_swaps_the_average_in_and_back() -> None:
    param, ema = _student()
    with torch.no_grad():
        param.fill_(5.0)
    with ema_applied(ema):
        assert torch.equal(param.detach(), torch.zeros(3))
    assert torch.equal(param.detach(), torch.full((3,), 5.0))


@pytest.mark.parametrize("n,step,due", [(5, 10, True), (5, 11, False), (1, 3, True), (0, 0, False), (0, 10, False),
                                        (-5, 10, False)])
def test_every_is_multiples_of_n_and_never_for_n_at_most_zero(n: int, step: int, due: bool) -> None:
    assert every(n, step) is due
