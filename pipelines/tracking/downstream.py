"""The MLflow run of a downstream job (DreamBooth, ControlNet, ReVersion): one helper for all of them.

``downstream_run`` opens (or, with ``run_id``, resumes) the run through ``client.start_run``: the
params logged with credentials redacted, the ``wadi.task`` tag, the end status (FINISHED, FAILED or
KILLED) set however the job ends. ``DownstreamRun.finish`` writes the job's ``metrics.json`` and
``table.md``, logs them and the job's other outputs as artifacts, and its wall time.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from wadi_core.redact import redact

from pipelines.tracking.client import Tracker, default_tracking_uri, start_run

__all__ = ["DownstreamRun", "downstream_run"]


@dataclass
class DownstreamRun:
    """An open downstream run: its tracker and where its outputs go."""

    tracker: Tracker
    task: str
    out: Path
    experiment: str
    tracking_uri: str
    params: Mapping[str, Any]
    started: float = field(default_factory=time.time)

    def finish(self, result: Mapping[str, Any], table: str, files: Sequence[str] = (), folders: Sequence[str] = (),
               metrics: Mapping[str, float] | None = None) -> dict[str, Any]:
        """``result`` + table, params (redacted), wall time and run id -> ``<out>/metrics.json`` and
        ``<out>/table.md``; then ``files`` and ``folders`` of ``out`` as artifacts, and the metrics."""
        full = {**result, "table": table, "params": redact(dict(self.params)),
                "wall_seconds": time.time() - self.started, "mlflow_run_id": self.tracker.run_id}
        (self.out / "metrics.json").write_text(json.dumps(full, indent=1))
        (self.out / "table.md").write_text(table)
        for name in files:
            self.tracker.log_artifact(self.out / name)
        for name in folders:
            if (self.out / name).exists():
                self.tracker.log_artifacts(self.out / name, name)
        self.tracker.log_metrics({"wall_seconds": full["wall_seconds"], **(metrics or {})})
        return full

    def where(self) -> str:
        """Where the outputs are, for the job's last line (credentials redacted)."""
        return redact(f"outputs: {self.out}; MLflow {self.tracking_uri}, experiment {self.experiment}")


@contextlib.contextmanager
def downstream_run(task: str, out: Path, experiment: str, tracking_uri: str = "", run_name: str = "",
                   params: Mapping[str, Any] | None = None, run_id: str | None = None,
                   started: float | None = None) -> Iterator[DownstreamRun]:
    """Open the run of downstream job ``task`` (name ``<task>-<out folder>`` unless given; the
    tracking URI "" = ``MLFLOW_TRACKING_URI``, else sqlite under ``./runs``)."""
    uri = tracking_uri or default_tracking_uri(Path.cwd() / "runs")
    with start_run(experiment, run_name=run_name or f"{task}-{out.name}", tracking_uri=uri, params=params,
                   tags={"wadi.task": task}, run_id=run_id) as tracker:
        yield DownstreamRun(tracker, task, out, experiment, uri, dict(params or {}),
                            time.time() if started is None else started)
