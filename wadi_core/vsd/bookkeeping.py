"""What both trainers do after each VSD step: one bookkeeping order and one cadence rule.

``wadi_core.local_train`` (one process) and ``pipelines.train.worker`` (a Ray Train worker) share
them, so a step is counted, guarded and averaged the same way whichever loop ran it.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Mapping

from wadi_core.vsd.ema import AdapterEMA
from wadi_core.vsd.state import TrainState
from wadi_core.vsd.step import NonFiniteGuard

__all__ = ["every", "StepBookkeeper", "ema_applied"]


def every(n: int, step: int) -> bool:
    """The one cadence rule (logging, samples, checkpoints, drain polls): multiples of ``n``; ``n <= 0``: never."""
    return n > 0 and step % n == 0


def ema_applied(ema: AdapterEMA | None) -> ContextManager[None]:
    """The student EMA swapped in (samples, adapter files, export); without an EMA a no-op."""
    return ema.applied() if ema is not None else contextlib.nullcontext()


class StepBookkeeper:
    """Advances a :class:`TrainState` after each VSD step, in one fixed order: step counter,
    non-finite guard, student EMA, counters."""

    def __init__(self, guard: NonFiniteGuard, ema: AdapterEMA | None) -> None:
        self.guard, self.ema = guard, ema

    def after_step(self, state: TrainState, metrics: Mapping[str, float], consumed: int, prompts: int) -> None:
        """Count the step ``metrics`` describe; ``consumed`` advances ``data_position`` (in the trainer's
        unit), ``prompts`` advances ``prompts_seen``."""
        state.step += 1
        # A skipped step (non-finite loss / gradient) is counted; N in a row raise NonFiniteTraining.
        self.guard.update(metrics, state.step)
        if self.ema is not None and not metrics.get("skipped_nonfinite"):  # a skipped step changed no weight
            self.ema.update()
        state.nonfinite_steps = self.guard.total
        state.data_position += consumed
        state.prompts_seen += prompts
