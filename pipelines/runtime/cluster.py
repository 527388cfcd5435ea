"""The one way jobs, pipelines and tests start or join Ray.

With no address given, ``ray.init()`` joins whatever cluster Ray's current-cluster file names
(``/tmp/ray/ray_current_cluster``): another user's ``ray start --head`` on the same machine, or a
stale file that makes the job hang. Here an address is used only when it was asked for
(``--address`` or ``RAY_ADDRESS``); otherwise a private local Ray is started
(``address="local"``) with a known CPU count.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import warnings
from typing import Any, Iterator, Mapping

from wadi_core.config import ConfigError

__all__ = ["ray_address", "local_cpus", "init_ray", "job_runtime_env", "without_job_conflicts",
           "check_accelerator_type", "check_accelerator_available"]

#: What ``ray job submit`` sets for the driver it starts: the job's config, runtime env included.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def ray_address(explicit: str | None = None) -> str:
    """``explicit`` (``--address``), else ``RAY_ADDRESS``, else ``"local"`` (a new local Ray)."""
    return explicit or os.environ.get("RAY_ADDRESS") or "local"


def local_cpus() -> int:
    """CPUs a local Ray started here gets: the ones this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def job_runtime_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The runtime env of the Ray job this driver runs in (``ray job submit --runtime-env-json``),
    or ``{}`` outside a submitted job."""
    raw = (os.environ if environ is None else environ).get(JOB_CONFIG_ENV)
    if not raw:
        return {}
    try:
        env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}
    return env if isinstance(env, dict) else {}


def without_job_conflicts(runtime_env: Mapping[str, Any] | None,
                          environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """``runtime_env`` minus what the submitted job's runtime env already sets.

    Ray refuses ``ray.init(runtime_env=...)`` inside a submitted job when both set the same field
    or the same environment variable, even to the same value ("Failed to merge the Job's runtime
    env"). The job's setting wins: its env_vars are already this driver's environment, and the
    job's runtime env reaches every worker anyway.
    """
    if not runtime_env:
        return None
    job = job_runtime_env(environ)
    if not job:
        return dict(runtime_env)
    job_vars = job.get("env_vars") or {}
    out = {k: v for k, v in runtime_env.items() if k != "env_vars" and k not in job}
    env_vars = {k: v for k, v in (runtime_env.get("env_vars") or {}).items() if k not in job_vars}
    if env_vars:
        out["env_vars"] = env_vars
    return out or None


def init_ray(address: str | None = None, num_cpus: float | None = None, **kwargs: Any) -> bool:
    """Start or join Ray once; returns True when a local Ray was started by this call.

    ``num_cpus`` applies to a local Ray only (default ``local_cpus()``); ``kwargs`` go to
    ``ray.init`` (``runtime_env``, ``include_dashboard``, ``log_to_driver`` ...). Inside a job
    submitted with its own runtime env, the fields and variables it sets are left out of
    ``runtime_env`` (``without_job_conflicts``).
    """
    import ray  # noqa: PLC0415 -- Ray only on the cluster path

    if ray.is_initialized():
        return False
    if "runtime_env" in kwargs:
        kwargs["runtime_env"] = without_job_conflicts(kwargs["runtime_env"])
    target = ray_address(address)
    if target == "local":
        num_cpus = num_cpus if num_cpus is not None else local_cpus()
        # Ray Train's placement-group cleaner (a detached actor of this cluster) asks the State API
        # each second whether the run's controller lives and removes the run's placement group on
        # "no such actor". Unpinned, it resolves the cluster like `ray status`: every GCS on the
        # host plus /tmp/ray/ray_current_cluster, so with another job's Ray here it fails or asks
        # that Ray; and a dashboard turned off still advertises 127.0.0.1:8265, which may be another
        # job's. So this cluster's processes inherit RAY_ADDRESS = its GCS (port chosen up front:
        # they copy the environment when ray.init starts them), an unserved dashboard gets a free
        # port, and the driver's environment is restored (a later init starts a new Ray).
        if kwargs.get("include_dashboard") is False:
            kwargs.setdefault("dashboard_port", _free_port())
        chosen = "RAY_GCS_SERVER_PORT" not in os.environ
        for attempt in (1, 2):
            gcs_port = os.environ.get("RAY_GCS_SERVER_PORT") or str(_free_port())
            try:
                with _environ(RAY_GCS_SERVER_PORT=gcs_port, RAY_ADDRESS=f"127.0.0.1:{gcs_port}"):
                    ray.init(address="local", num_cpus=num_cpus, **kwargs)
                return True
            except RuntimeError as e:  # the free port was taken before the GCS bound it: once more
                if not chosen or attempt == 2 or "Failed to start GCS" not in str(e):
                    raise
                ray.shutdown()
    kwargs.pop("include_dashboard", None)  # a setting of the cluster, not of a driver joining it
    ray.init(address=target, **kwargs)
    return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """``values`` in ``os.environ`` for the block (what processes started in it inherit)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_ACCELERATOR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def check_accelerator_type(name: str, gpus: float, where: str, gpus_key: str) -> None:
    """An accelerator type (Ray's name of a GPU model: A100, H100, L4, A10G ...) is well formed
    and comes with GPUs; "" (any GPU) passes. Raises ``ConfigError`` with what to set."""
    if not name:
        return
    if not _ACCELERATOR_NAME.fullmatch(name):
        raise ConfigError(f"{where}={name!r} is not a Ray accelerator type: use the GPU model name Ray detects "
                          "on a node (A100, H100, L4, A10G ...; `ray status -v` lists them as "
                          "accelerator_type:<name>), or leave it empty for any GPU")
    if gpus <= 0:
        raise ConfigError(f"{where}={name} places work on {name} GPUs, but {gpus_key} is {gpus:g}: "
                          f"set {gpus_key} > 0, or leave {where} empty")


def check_accelerator_available(name: str, cluster_resources: Mapping[str, float], where: str,
                                strict: bool = True) -> None:
    """Some node of the cluster has accelerator ``name`` (resource ``accelerator_type:<name>``);
    ``strict=False`` (a cluster that may autoscale) warns instead of raising."""
    if not name or f"accelerator_type:{name}" in cluster_resources:
        return
    found = sorted(k.split(":", 1)[1] for k in cluster_resources if k.startswith("accelerator_type:"))
    msg = (f"{where}={name}: no node of this Ray cluster has that accelerator (found: "
           f"{', '.join(found) or 'none'}): the work would wait forever; pick one of those or leave it empty")
    if strict:
        raise ConfigError(msg)
    warnings.warn(msg + " (an autoscaling cluster may still add such nodes)")
