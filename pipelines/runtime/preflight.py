"""Checks of a job against the outside world, on the driver, before Ray starts or is joined.

``pipelines.config.job`` checks the values themselves; this module checks what they point at, so
that a wrong teacher path, a tracking server that is down or refuses the credentials, or a
worker layout that leaves Ray Data no CPU fails in seconds with a message, not inside the
workers after several restarts. Every failure is a ``ConfigError``.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

from wadi_core.config import ConfigError
from wadi_core.redact import redact
from wadi_core.storage import is_remote, s3_endpoint

from pipelines.config.job import NUM_TRAIN_TIMESTEPS, DistillConfig

__all__ = ["check_teacher", "check_tracking_server", "check_cpu_headroom", "preflight"]

TIMEOUT_S = 5.0


def _check_timesteps(cfg: DistillConfig, scheduler_config: dict) -> None:
    n = int(scheduler_config.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS))
    if not cfg.vsd.t_max < n or not cfg.vsd.student_timestep < n:
        raise ConfigError(f"vsd.t_max={cfg.vsd.t_max} and vsd.student_timestep={cfg.vsd.student_timestep} must "
                          f"be < the teacher's num_train_timesteps ({n}, from its scheduler config)")


def check_teacher(cfg: DistillConfig, timeout: float = TIMEOUT_S) -> None:
    """The teacher exists and is readable: "embedded"; a local diffusers folder with a readable
    ``model_index.json``; an ``s3://`` prefix whose ``model_index.json`` answers a HEAD; a hub id."""
    teacher = cfg.teacher
    if teacher in ("embedded", "embedded_teacher"):
        return
    if is_remote(teacher):
        _head_s3(teacher.rstrip("/") + "/model_index.json", timeout)
        return
    path = Path(teacher).expanduser()
    if not path.exists():
        if teacher.count("/") == 1 and not teacher.startswith((".", "/", "~")):
            return  # a hub id (org/name): resolved by the workers (HF_HUB_OFFLINE refuses it there)
        raise ConfigError(f"teacher={teacher!r} does not exist: pass a diffusers folder, an s3:// prefix, "
                          "a hub id (org/name) or 'embedded'")
    index = path / "model_index.json"
    try:
        json.loads(index.read_text())
    except FileNotFoundError:
        raise ConfigError(f"teacher={teacher!r} has no model_index.json: pass the root of a diffusers "
                          "pipeline folder (the one saved by save_pretrained)") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"teacher={teacher!r}: cannot read {index} ({type(e).__name__}: {e})") from None
    scheduler = path / "scheduler" / "scheduler_config.json"
    if scheduler.exists():
        try:
            scheduler_config = json.loads(scheduler.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"teacher={teacher!r}: cannot read {scheduler} ({type(e).__name__})") from None
        _check_timesteps(cfg, scheduler_config)


def _head_s3(uri: str, timeout: float) -> None:
    """HEAD one object with a short timeout and no retries."""
    import boto3  # noqa: PLC0415 -- the AWS SDK only for s3:// paths
    import botocore.config  # noqa: PLC0415 -- the AWS SDK only for s3:// paths
    import botocore.exceptions  # noqa: PLC0415 -- the AWS SDK only for s3:// paths

    bucket, _, key = uri[len("s3://"):].partition("/")
    client = boto3.client(
        "s3", endpoint_url=s3_endpoint(),
        config=botocore.config.Config(connect_timeout=timeout, read_timeout=timeout,
                                      retries={"max_attempts": 1, "mode": "standard"}),
    )
    try:
        client.head_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        what = "does not exist" if code in ("404", "NoSuchKey", "NotFound") else f"is not readable ({code})"
        raise ConfigError(redact(f"teacher {uri} {what}: check the teacher prefix, the bucket and the "
                                 "S3 credentials")) from None
    except botocore.exceptions.NoCredentialsError:
        raise ConfigError(f"teacher {redact(uri)}: no AWS credentials found (set AWS_ACCESS_KEY_ID / "
                          "AWS_SECRET_ACCESS_KEY, a profile, or an instance role)") from None
    except (botocore.exceptions.BotoCoreError, OSError) as e:
        raise ConfigError(redact(f"teacher {uri}: S3 did not answer within {timeout:g} s ({type(e).__name__}): "
                                 "check AWS_ENDPOINT_URL and the network")) from None


def _auth_request(uri: str, path: str) -> urllib.request.Request:
    """A request to ``uri + path`` with the credentials MLflow would send (URI user info,
    ``MLFLOW_TRACKING_USERNAME/PASSWORD`` or ``MLFLOW_TRACKING_TOKEN``)."""
    parts = urllib.parse.urlsplit(uri)
    user, password = parts.username, parts.password
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + path, "", ""))
    req = urllib.request.Request(url)
    user = urllib.parse.unquote(user) if user else os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = urllib.parse.unquote(password) if password else os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user is not None and password is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        req.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    return req


def tracking_problem(uri: str, experiment: str, timeout: float = TIMEOUT_S) -> str | None:
    """Why an http(s) tracking server cannot be used (down, refuses the credentials), or None."""
    if not uri.startswith(("http://", "https://")):
        return None
    query = "/api/2.0/mlflow/experiments/get-by-name?" + urllib.parse.urlencode({"experiment_name": experiment})
    try:
        urllib.request.urlopen(_auth_request(uri, query), timeout=timeout).close()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            return f"it refuses the credentials (HTTP {e.code}): check the user and password"
        if e.code == 404:
            try:  # MLflow answers a missing experiment with 404 RESOURCE_DOES_NOT_EXIST: reachable
                if b"RESOURCE_DOES_NOT_EXIST" in e.read():
                    return None
            except OSError:
                pass
            return "it answered 404 to the MLflow REST API: is this the server's root URL?"
        return f"it answered HTTP {e.code}"
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return f"it cannot be reached within {timeout:g} s ({type(e).__name__}: {reason})"
    return None


def check_tracking_server(cfg: DistillConfig, timeout: float = TIMEOUT_S) -> None:
    """An explicitly set tracking server (``tracking.uri`` or ``MLFLOW_TRACKING_URI``) must answer
    and accept the credentials, unless ``tracking.require_server=false``. The embedded default
    (a local sqlite file) is not checked."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return
    problem = tracking_problem(uri, cfg.tracking.experiment, timeout)
    if problem is None:
        return
    source = "tracking.uri" if cfg.tracking.uri else "MLFLOW_TRACKING_URI"
    msg = redact(f"MLflow tracking server {uri} ({source}): {problem}")
    if cfg.tracking.require_server:
        raise ConfigError(msg + ". Fix the server or its credentials, or pass tracking.require_server=false "
                          "to run untracked")
    warnings.warn(msg + "; tracking.require_server=false: the job runs untracked")


def check_cpu_headroom(cfg: DistillConfig, total_cpus: float, strict: bool = True) -> None:
    """Ray Data reads prompts beside the train workers: at least one CPU must stay free, or the
    run hangs (``backpressured ... budget=(cpu=0.0``). ``strict=False`` (a cluster that may
    autoscale) warns instead of raising."""
    d = cfg.data
    encoders = d.encoder_actors * d.encoder_cpus_per_actor if d.text_encoding == "actors" else 0.0
    check_worker_cpus(cfg.train.num_workers, cfg.train.cpus_per_worker, total_cpus, strict, encoders=encoders)


def check_worker_cpus(num_workers: int, cpus_per_worker: float, total_cpus: float, strict: bool = True,
                      keys: tuple[str, str] = ("train.num_workers", "train.cpus_per_worker"),
                      encoders: float = 0.0) -> None:
    """At least one of Ray's CPUs left to Ray Data beside ``num_workers`` train workers (and text
    encoder actors), named by the config ``keys`` the user would change."""
    used = num_workers * cpus_per_worker
    if total_cpus - used - encoders >= 1.0 - 1e-9:
        return
    fit = max(0.1, (total_cpus - encoders - 1) / num_workers)
    also = (f" and data.encoder_actors x data.encoder_cpus_per_actor = {encoders:g} (lower those too)"
            if encoders else "")
    msg = (f"{keys[0]} x {keys[1]} = {num_workers} x {cpus_per_worker:g} "
           f"= {used:g}{also} of Ray's {total_cpus:g} CPUs leaves Ray Data less than 1 CPU to read its data with "
           f"(the run would hang): lower {keys[1]} (e.g. {fit:.2g}) or {keys[0]}, or give Ray "
           "more CPUs")
    if strict:
        raise ConfigError(msg)
    warnings.warn(msg + " (an autoscaling cluster may still add nodes)")


def preflight(cfg: DistillConfig, local_cpus: float | None = None) -> None:
    """Every check above; ``local_cpus`` = the CPUs of the local Ray about to be started (None
    when joining a cluster, which is checked once joined)."""
    check_teacher(cfg)
    check_tracking_server(cfg)
    if local_cpus is not None:
        check_cpu_headroom(cfg, local_cpus)
