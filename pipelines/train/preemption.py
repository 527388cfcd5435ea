"""Why a training run checkpoints or stops before its end: a drain notice for one of its nodes, or
a stop request (SIGINT / SIGTERM to the driver, pipelines/runtime/stop.py)."""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from pipelines.runtime.collectives import any_rank_true, sum_over_ranks
from pipelines.runtime.stop import StopWatch

__all__ = ["PreemptionWatch", "PREEMPTION_POLL_EVERY"]

#: Steps between polls of Ray Train's drain notice (``ray.train.get_preemption_info``, a barrier
#: through Ray's synchronization actor: ~ms; Ray's own watcher polls the GCS every 5 s).
PREEMPTION_POLL_EVERY = int(os.environ.get("WADI_PREEMPTION_POLL_EVERY", "1"))


class PreemptionWatch:
    """One rank's watch for drain notices and stop requests; every decision is one collective, so
    all ranks checkpoint or stop at the same step."""

    def __init__(self, stop_watch: StopWatch, rank: int, world: int, device: torch.device | str) -> None:
        self.stop_watch, self.rank, self.world, self.device = stop_watch, rank, world, device
        self.notice_step: int | None = None  # step at which a drain (preemption) notice was seen
        self.saved_before_deadline = False
        self.stop_requested = False

    def go_on(self, has_batch: bool) -> bool:
        """True while every rank has a batch and no stop was requested (rank 0 polls the flag): one
        collective per step."""
        stop = self.rank == 0 and self.stop_watch.requested()
        has, stops = sum_over_ranks([has_batch, stop], self.device)
        if stops:
            self.stop_requested = True
        return has == self.world and not stops

    def checkpoint_due(self, step: int, step_seconds: float, checkpoint_seconds: float) -> bool:
        """All ranks, every ``PREEMPTION_POLL_EVERY`` steps: True when a checkpoint must be written
        now because a node of this run is being drained (spot reclaim, autoscaler v2, KubeRay, ``ray
        drain-node --reason DRAIN_NODE_REASON_PREEMPTION``): once at the notice, and once more just
        before the reclaim deadline, so a reclaim loses only the steps after that. Training goes on
        in between; at the deadline Ray Train restarts the group, which resumes from the newest."""
        import ray.train  # noqa: PLC0415 -- Ray only on the cluster path

        info: Any = ray.train.get_preemption_info()  # a collective: the same answer on every rank
        if info is None:
            return False
        if self.notice_step is None:
            self.notice_step = step
            print(f"[wadi] rank {self.rank}: drain notice for nodes {info.preempted_node_ids} (ranks "
                  f"{info.preempted_ranks}, deadline_ms {info.deadline_ms}) at step {step}: "
                  "checkpointing now", flush=True)
            return True
        if self.saved_before_deadline or not info.deadline_ms:
            return False
        left_s = info.deadline_ms / 1000 - time.time()
        due = left_s < 2 * (checkpoint_seconds + step_seconds) + 1.0
        if any_rank_true(due, self.device):
            self.saved_before_deadline = True
            return True
        return False
