"""Stopping a distillation job cleanly on SIGINT / SIGTERM (Ctrl-C, ``kill``, ``ray job stop``).

The driver does not kill its workers: the first signal sets a flag in a small Ray actor
(:class:`StopFlag`); rank 0 polls it between steps and the train loop's per-step collective
carries the answer to every rank, so all ranks stop after the same step, write a checkpoint of
it and return. The driver then ends the MLflow run as KILLED and the job exits with
``128 + signal`` (130 for SIGINT, 143 for SIGTERM), as a shell reports a process killed by it. A
rerun with the same run name resumes at the next step, so no step is trained or logged twice.

A second signal, a signal after the fit (export, evaluation), or no stop within ``grace_s`` aborts
at once (:class:`RunInterrupted` with ``forced``): the run then resumes from its last periodic
checkpoint.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Any, Callable, Iterator, TypeVar

__all__ = ["RunInterrupted", "StopFlag", "StopWatch", "SignalState", "stop_on_signals", "call_in_thread",
           "exit_code"]

T = TypeVar("T")

#: Seconds between rank 0's polls of the stop flag (one actor call: ~1 ms).
POLL_S = 0.5


def exit_code(signum: int) -> int:
    """The documented exit code of a job stopped by ``signum``: 128 + signum."""
    return 128 + int(signum)


class RunInterrupted(Exception):
    """The job was stopped by a signal; ``checkpoint`` holds the newest checkpoint, if any."""

    mlflow_status = "KILLED"  # pipelines.tracking.client.start_run ends the run with this status

    def __init__(self, signum: int, step: int | None, checkpoint: str | None, forced: bool = False):
        self.signum, self.step, self.checkpoint, self.forced = signum, step, checkpoint, forced
        super().__init__(signum, step, checkpoint, forced)

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        how = "aborted at once" if self.forced else f"stopped after step {self.step}"
        where = f"; newest checkpoint {self.checkpoint}" if self.checkpoint else ""
        return f"{name}: {how}{where}. Rerun the same command to resume."


class StopFlag:
    """Ray actor (no CPU): the driver sets it, rank 0 of the train loop reads it."""

    def __init__(self) -> None:
        self.signum = 0

    def request(self, signum: int) -> None:
        self.signum = self.signum or int(signum)

    def requested(self) -> int:
        return self.signum


class StopWatch:
    """Worker side: ``requested()`` asks the :class:`StopFlag` actor at most every ``poll_s``."""

    def __init__(self, flag: Any | None, poll_s: float = POLL_S):
        self.flag, self.poll_s = flag, poll_s
        self._last, self._signum = 0.0, 0

    def requested(self) -> bool:
        if self.flag is None or self._signum:
            return bool(self._signum)
        now = time.monotonic()
        if now - self._last >= self.poll_s:
            self._last = now
            import ray  # noqa: PLC0415 -- Ray only on the cluster path

            with contextlib.suppress(Exception):  # the driver is gone: Ray ends this worker anyway
                self._signum = ray.get(self.flag.requested.remote(), timeout=10)
        return bool(self._signum)


class SignalState:
    """What :func:`stop_on_signals` saw: ``signum`` of the first signal (0: none). While
    ``graceful`` is True (the fit) a first signal asks for a clean stop; after it, any signal
    aborts at once."""

    def __init__(self) -> None:
        self.signum = 0
        self.graceful = True


@contextlib.contextmanager
def stop_on_signals(flag: Any, grace_s: float = 120.0) -> Iterator[SignalState]:
    """While the block runs, SIGINT / SIGTERM request a clean stop through ``flag`` (a
    :class:`StopFlag` actor handle); a second signal, a signal once ``graceful`` is off, or
    ``grace_s`` without a stop raise :class:`RunInterrupted` (``forced``). Outside the main thread
    (no signal handlers there) it only yields."""
    seen = SignalState()
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def on_signal(signum: int, frame: Any) -> None:
        if seen.signum or not seen.graceful:
            raise RunInterrupted(seen.signum or signum, None, None, forced=True)
        seen.signum = signum
        flag.request.remote(signum)
        print(f"\n[wadi] {signal.Signals(signum).name}: stopping after the current step and writing a "
              f"checkpoint (signal again to abort now)", flush=True)
        signal.setitimer(signal.ITIMER_REAL, grace_s)

    def on_alarm(signum: int, frame: Any) -> None:
        print(f"[wadi] the workers did not stop within {grace_s:g} s: aborting", flush=True)
        raise RunInterrupted(seen.signum, None, None, forced=True)

    previous = {s: signal.signal(s, h) for s, h in
                ((signal.SIGINT, on_signal), (signal.SIGTERM, on_signal), (signal.SIGALRM, on_alarm))}
    try:
        yield seen
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in previous.items():
            signal.signal(s, h)


def call_in_thread(fn: Callable[[], T]) -> T:
    """``fn()`` in a helper thread while the main thread waits, so this module's handlers keep
    the signals: Ray Train's ``fit()`` in the main thread installs its own SIGINT handler, which
    aborts the controller (no final checkpoint, MLflow FAILED). Exceptions of ``fn`` re-raise here."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out["error"] = e

    thread = threading.Thread(target=target, name="wadi-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.2)  # short waits: a signal handler runs between them
    if "error" in out:
        raise out["error"]
    return out["value"]
