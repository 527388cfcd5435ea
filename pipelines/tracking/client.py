"""MLflow tracking that never takes a job down.

An unreachable tracking server is a warning here: the run goes on and logs nothing (a job that
must be tracked checks the server first, ``pipelines.runtime.preflight``). Params are filtered so that
nothing that looks like a credential reaches MLflow, and user info in any URI
(``s3://KEY:SECRET@bucket``, ``http://user:pw@host``) is redacted by ``redact`` in every param,
tag, warning and printed line.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import re
import subprocess
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

from wadi_core.redact import redact, without_user_info

log = logging.getLogger(__name__)

_SECRET = re.compile(r"(secret|password|passwd|token|credential|access_key|session_key|api_key)", re.I)


class RedactingFilter(logging.Filter):
    """A logging filter (install it on handlers) that redacts URI user info in every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "://" in message:
            record.msg, record.args = redact(message), None
        return True


def install_log_redaction(loggers: tuple[str, ...] = ("", "ray", "mlflow")) -> None:
    """Redact URI user info in what the handlers of these loggers print (a job calls this once;
    the root logger gets a WARNING handler like Python's last-resort one if it has none)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setLevel(logging.WARNING)
        root.addHandler(handler)
    for name in loggers:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())


def default_tracking_uri(root: str | os.PathLike | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a sqlite file (absolute path) under ``root``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = Path(root or Path.cwd()).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def safe_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Drop keys that look like credentials, redact URI user info; stringify and truncate values
    (MLflow limit)."""
    out = {}
    for k, v in params.items():
        if _SECRET.search(k):
            continue
        out[k] = redact(str(v))[:6000]
    return out


def git_sha(repo: str | os.PathLike | None = None) -> str:
    """The commit of the code that runs (``WADI_GIT_SHA`` in images built without ``.git``)."""
    if os.environ.get("WADI_GIT_SHA"):
        return os.environ["WADI_GIT_SHA"]
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "HEAD"], cwd=repo or Path(__file__).resolve().parents[2],
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
            warnings.warn(redact(f"MLflow {fn} failed ({type(e).__name__}: {e}); continuing without it"))
            return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._call("log_params", safe_params(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, model_id: str | None = None,
                    dataset: Any | None = None) -> None:
        """Metrics of the run; ``model_id`` / ``dataset`` also tie them to an MLflow 3 LoggedModel and
        the data they were computed on."""
        links = {k: v for k, v in (("model_id", model_id), ("dataset", dataset)) if v is not None}
        self._call("log_metrics", {k: float(v) for k, v in metrics.items()}, step=step, **links)

    def log_input(self, dataset: Any, context: str, model_id: str | None = None,
                  tags: Mapping[str, Any] | None = None) -> None:
        """A dataset input of the run (``mlflow.log_input``), optionally as the input of a LoggedModel."""
        model = None
        if model_id and self._mlflow is not None:
            from mlflow.entities import LoggedModelInput  # noqa: PLC0415 -- MLflow is optional and slow to import

            model = LoggedModelInput(model_id)
        self._call("log_input", dataset, context=context, model=model,
                   tags={k: redact(str(v)) for k, v in (tags or {}).items()} or None)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._call("set_tags", {k: redact(str(v)) for k, v in tags.items()})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._call("log_artifact", str(path), artifact_path=artifact_path)

    def log_artifacts(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._call("log_artifacts", str(path), artifact_path=artifact_path)

    def log_image(self, image: Any, key: str, step: int) -> None:
        """A step-aware image (MLflow 3: the UI's image slider per ``key``)."""
        self._call("log_image", image, key=key, step=int(step))


@contextlib.contextmanager
def start_run(
    experiment: str,
    run_name: str | None = None,
    tracking_uri: str | None = None,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    nested: bool = False,
    log_system_metrics: bool = False,
    started_at: float | None = None,
) -> Iterator[Tracker]:
    """Open (or resume, with ``run_id``) an MLflow run; yields a Tracker.

    ``started_at`` (epoch seconds) back-dates a new run's start, so a run logged once its work is
    done (an evaluation) shows how long that work took, not the milliseconds of logging it.

    ``log_system_metrics``: MLflow samples CPU / memory / disk / network, and GPUs when
    ``nvidia-ml-py`` is installed (extra ``system-metrics``), as ``system/*`` metrics of the run
    while it is open in this process.

    If MLflow is missing or the server cannot be reached, warns and yields an inactive
    Tracker so the job continues.
    """
    try:
        import mlflow  # noqa: PLC0415 -- MLflow is optional and slow to import
    except ImportError:
        warnings.warn("mlflow is not installed: tracking is off")
        yield Tracker(None, None)
        return
    uri = tracking_uri or default_tracking_uri()
    reason = unreachable_reason(uri)
    if reason:
        warnings.warn(redact(f"MLflow tracking at {uri} is unreachable ({reason}); "
                             "the job continues without tracking"))
        yield Tracker(None, None)
        return
    try:
        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(
            experiment, artifact_location=_sqlite_artifact_location(uri, experiment))
        # A resumed run that had FINISHED stays FINISHED if this attempt fails (see below).
        prior_status = client.get_run(run_id).info.status if run_id else None
        if started_at is not None and run_id is None:
            run_id = client.create_run(exp_id, start_time=int(started_at * 1000), run_name=run_name,
                                       tags={k: str(v) for k, v in (tags or {}).items()}).info.run_id
        run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp_id,
                               run_name=run_name, nested=nested,
                               log_system_metrics=log_system_metrics or None)
    except Exception as e:
        warnings.warn(redact(f"MLflow tracking at {uri} is unreachable ({type(e).__name__}: {e}); "
                             "the job continues without tracking"))
        yield Tracker(None, None)
        return
    tracker = Tracker(run, mlflow)
    if params:
        tracker.log_params(params)
    if tags:
        tracker.set_tags(tags)
    try:
        yield tracker
    except BaseException as e:
        with contextlib.suppress(Exception):
            if prior_status == "FINISHED":  # its results stand; the failed resume is a tag, not a status
                mlflow.set_tag("wadi.last_resume_error", redact(f"{type(e).__name__}: {e}")[:5000])
                mlflow.end_run(status="FINISHED")
            else:  # a job stopped by a signal says KILLED (pipelines.runtime.stop.RunInterrupted)
                killed = isinstance(e, KeyboardInterrupt) or getattr(e, "mlflow_status", "") == "KILLED"
                mlflow.end_run(status="KILLED" if killed else "FAILED")
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
    # /health needs no credentials; user info in the URI (MLflow sends it as basic auth) would be
    # taken for part of the host name, and a password with a "/" for a port.
    try:
        urllib.request.urlopen(without_user_info(uri).rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered (auth, proxy path...): let MLflow handle it
    except (OSError, ValueError, http.client.HTTPException) as e:
        return redact(f"{type(e).__name__}: {e}")
    return None


def _sqlite_artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a sqlite store next to the db file (MLflow's default is ./mlruns of the cwd,
    which differs between the driver and Ray workers)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    return (db.parent / "mlartifacts" / re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment)).as_uri()


def redact_uri(uri: str) -> str:
    """Hide ``user:password@`` in URIs before they are printed (``redact`` for one string)."""
    return redact(str(uri))
