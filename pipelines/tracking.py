"""MLflow tracking that never takes a job down.

An unreachable tracking server is a warning: the run goes on and logs nothing. Params are
filtered so that nothing that looks like a credential reaches MLflow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

log = logging.getLogger(__name__)

_SECRET = re.compile(r"(secret|password|passwd|token|credential|access_key|session_key|api_key)", re.I)


def default_tracking_uri(root: str | os.PathLike | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a sqlite file (absolute path) under ``root``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = Path(root or Path.cwd()).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def safe_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Drop keys that look like credentials; stringify and truncate values (MLflow limit)."""
    out = {}
    for k, v in params.items():
        if _SECRET.search(k):
            continue
        out[k] = str(v)[:6000]
    return out


def git_sha(repo: str | os.PathLike | None = None) -> str:
    """The commit of the code that runs (``WADI_GIT_SHA`` in images built without ``.git``)."""
    if os.environ.get("WADI_GIT_SHA"):
        return os.environ["WADI_GIT_SHA"]
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "HEAD"], cwd=repo or Path(__file__).resolve().parents[1],
            stderr=subprocess.DEVNULL, text=True,
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Tracker:
    """Thin wrapper over one MLflow run; every call is a no-op when tracking is off."""

    def __init__(self, run: Any | None, mlflow_module: Any | None):
        self.run = run
        self._mlflow = mlflow_module

    @property
    def active(self) -> bool:
        return self.run is not None

    @property
    def run_id(self) -> str | None:
        return self.run.info.run_id if self.run is not None else None

    def _call(self, fn: str, *args: Any, **kwargs: Any) -> Any:
        if self.run is None:
            return None
        try:
            return getattr(self._mlflow, fn)(*args, **kwargs)
        except Exception as e:  # tracking must never crash training
            warnings.warn(f"MLflow {fn} failed ({type(e).__name__}: {e}); continuing without it")
            return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._call("log_params", safe_params(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._call("log_metrics", {k: float(v) for k, v in metrics.items()}, step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._call("set_tags", {k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._call("log_artifact", str(path), artifact_path=artifact_path)

    def log_artifacts(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._call("log_artifacts", str(path), artifact_path=artifact_path)

    def log_image(self, image: Any, artifact_file: str) -> None:
        self._call("log_image", image, artifact_file=artifact_file)


@contextlib.contextmanager
def start_run(
    experiment: str,
    run_name: str | None = None,
    tracking_uri: str | None = None,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    nested: bool = False,
) -> Iterator[Tracker]:
    """Open (or resume, with ``run_id``) an MLflow run; yields a Tracker.

    If MLflow is missing or the server cannot be reached, warns and yields an inactive
    Tracker so the job continues.
    """
    try:
        import mlflow
    except ImportError:
        warnings.warn("mlflow is not installed: tracking is off")
        yield Tracker(None, None)
        return
    uri = tracking_uri or default_tracking_uri()
    reason = unreachable_reason(uri)
    if reason:
        warnings.warn(f"MLflow tracking at {redact_uri(uri)} is unreachable ({reason}); "
                      "the job continues without tracking")
        yield Tracker(None, None)
        return
    try:
        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(
            experiment, artifact_location=_sqlite_artifact_location(uri, experiment))
        run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp_id,
                               run_name=run_name, nested=nested)
    except Exception as e:
        warnings.warn(f"MLflow tracking at {redact_uri(uri)} is unreachable ({type(e).__name__}: {e}); "
                      "the job continues without tracking")
        yield Tracker(None, None)
        return
    tracker = Tracker(run, mlflow)
    if params:
        tracker.log_params(params)
    if tags:
        tracker.set_tags(tags)
    try:
        yield tracker
    except BaseException:
        with contextlib.suppress(Exception):
            mlflow.end_run(status="FAILED")
        raise
    else:
        with contextlib.suppress(Exception):
            mlflow.end_run()


def unreachable_reason(uri: str, timeout: float = 5.0) -> str | None:
    """Probe an http(s) tracking server's ``/health`` quickly.

    MLflow's own client retries with exponential backoff for minutes; a job should not stall
    that long on a tracking server that is down.
    """
    if not uri.startswith(("http://", "https://")):
        return None
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered (auth, proxy path...): let MLflow handle it
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _sqlite_artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a sqlite store next to the db file (MLflow's default is ./mlruns of the cwd,
    which differs between the driver and Ray workers)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    return (db.parent / "mlartifacts" / re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment)).as_uri()


def redact_uri(uri: str) -> str:
    """Hide ``user:password@`` in URIs before they are printed."""
    return re.sub(r"//[^/@]+@", "//***@", uri)
