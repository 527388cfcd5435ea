"""The one way jobs, pipelines and tests start or join Ray.

With no address given, ``ray.init()`` joins whatever cluster Ray's current-cluster file names
(``/tmp/ray/ray_current_cluster``): another user's ``ray start --head`` on the same machine, or a
stale file that makes the job hang. Here an address is used only when it was asked for
(``--address`` or ``RAY_ADDRESS``); otherwise a private local Ray is started
(``address="local"``) with a known CPU count.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["ray_address", "local_cpus", "init_ray"]


def ray_address(explicit: str | None = None) -> str:
    """``explicit`` (``--address``), else ``RAY_ADDRESS``, else ``"local"`` (a new local Ray)."""
    return explicit or os.environ.get("RAY_ADDRESS") or "local"


def local_cpus() -> int:
    """CPUs a local Ray started here gets: the ones this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def init_ray(address: str | None = None, num_cpus: float | None = None, **kwargs: Any) -> bool:
    """Start or join Ray once; returns True when a local Ray was started by this call.

    ``num_cpus`` applies to a local Ray only (default ``local_cpus()``); ``kwargs`` go to
    ``ray.init`` (``runtime_env``, ``include_dashboard``, ``log_to_driver`` ...).
    """
    import ray

    if ray.is_initialized():
        return False
    target = ray_address(address)
    if target == "local":
        ray.init(address="local", num_cpus=num_cpus if num_cpus is not None else local_cpus(), **kwargs)
        return True
    kwargs.pop("include_dashboard", None)  # a setting of the cluster, not of a driver joining it
    ray.init(address=target, **kwargs)
    return False
