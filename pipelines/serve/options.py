"""What a served model is and how Ray Serve runs it: batching, replicas or autoscaling, CPUs and GPUs.

Frozen dataclasses, the configuration sections of ``jobs/serve.py`` (``student.batch.max_batch_size=16``);
``deployment_options`` turns one into the keyword arguments of ``Deployment.options``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from pipelines.serve.validation import RequestLimits

__all__ = ["BatchOptions", "ReplicaOptions", "ModelOptions", "ServeConfig", "deployment_options", "ray_serve_env"]

DRAIN_PERIOD_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"  # Serve's direct-ingress drain (s)


@dataclass(frozen=True)
class BatchOptions:
    """``@serve.batch``: up to ``max_batch_size`` requests, waiting at most ``batch_wait_timeout_s`` for more."""

    max_batch_size: int = 32                # most (prompt, seed) images one replica samples in one batch
    batch_wait_timeout_s: float = 0.01      # seconds a batch waits for more requests after its first one

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if not 0 <= self.batch_wait_timeout_s <= 10:
            raise ValueError(f"batch_wait_timeout_s must be in [0, 10] seconds, got {self.batch_wait_timeout_s}")


@dataclass(frozen=True)
class ReplicaOptions:
    """A fixed ``num_replicas``, or autoscaling between ``min_replicas`` and ``max_replicas`` on ongoing requests."""

    num_replicas: int = 1                   # replicas when autoscaling is off
    autoscaling: bool = False               # scale between min_replicas and max_replicas (num_replicas unused)
    min_replicas: int = 1                   # fewest replicas when autoscaling (0: scale to zero when idle)
    max_replicas: int = 4                   # most replicas when autoscaling
    target_ongoing_requests: float = 32.0   # per replica: about one full batch in flight
    num_cpus: float = 1.0                   # ray_actor_options: the CPUs Ray reserves for each replica
    torch_threads: int = 0                  # on CPU, torch's threads per replica; 0: num_cpus (at least 1)
    num_gpus: float = 0.0                   # > 0: the replica samples on CUDA (float16 unless dtype says otherwise)
    # sys.setswitchinterval in the replica: how long the sampling thread may keep the GIL while the request
    # threads wait for it (Python's default 5 ms lets a busy sampler starve the intake of the next batch)
    gil_switch_interval_s: float = 0.0005
    # glibc keeps freed memory for the next batch instead of returning it to the kernel and faulting it back in
    # (pipelines/runtime/memory.py: ~13 % more images/s on 2 cores); the replica keeps its peak heap
    keep_freed_memory: bool = True

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}")
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas, max_replicas >= 1; got "
                             f"{self.min_replicas}, {self.max_replicas}")
        if self.target_ongoing_requests <= 0:
            raise ValueError(f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")
        if not 1e-6 <= self.gil_switch_interval_s <= 0.1:
            raise ValueError(f"gil_switch_interval_s must be in [1e-6, 0.1] seconds (Python's default is 0.005), "
                             f"got {self.gil_switch_interval_s}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"num_cpus and num_gpus must be >= 0, got {self.num_cpus}, {self.num_gpus}")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads must be >= 0 (0: from num_cpus), got {self.torch_threads}")

    @property
    def cpu_threads(self) -> int:
        """torch's intra-op threads in a CPU replica: ``torch_threads``, else ``num_cpus`` (at least 1)."""
        return self.torch_threads or max(1, int(self.num_cpus))


@dataclass(frozen=True)
class ModelOptions:
    """One served model: its URI (``models:/name@alias``, an export folder, ``s3://``, "embedded"), the sampler
    (1 step and no CFG for the student; the teacher's N steps and CFG), precision and how Serve runs it."""

    uri: str = "models:/wadi-embedded@candidate"
    steps: int = 1
    guidance: float = 1.0
    dtype: str = "auto"          # auto: float16 on a GPU, float32 on CPU
    batch: BatchOptions = field(default_factory=BatchOptions)
    replicas: ReplicaOptions = field(default_factory=ReplicaOptions)

    def __post_init__(self) -> None:
        if not self.uri:
            raise ValueError("model uri is empty: pass models:/NAME@ALIAS, an export folder or s3://...")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.guidance < 1.0:
            raise ValueError(f"guidance must be >= 1 (1 = off), got {self.guidance}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")


@dataclass(frozen=True)
class ServeConfig:
    """``jobs/serve.py``'s configuration (and a RayService application's ``args``): the student (``model``), an optional ``teacher``, where to listen."""

    model: str = "models:/wadi-embedded@candidate"  # models:/NAME@ALIAS, an export folder, s3://..., runs:/...
    teacher: str | None = None       # e.g. "embedded" or a diffusers folder: served at /generate?model=teacher
    teacher_steps: int = 25          # the served teacher's sampling steps
    teacher_guidance: float = 3.0    # the served teacher's CFG scale (1: no CFG)
    host: str = "127.0.0.1"          # loopback by default: 0.0.0.0 exposes the API to the network
    port: int = 8000                 # HTTP port of the Serve proxy
    dtype: str = "auto"              # auto: float16 on GPU replicas, float32 on CPU
    batch: BatchOptions = field(default_factory=BatchOptions)
    replicas: ReplicaOptions = field(default_factory=ReplicaOptions)
    teacher_batch: BatchOptions = field(default_factory=lambda: BatchOptions(max_batch_size=8))
    teacher_replicas: ReplicaOptions = field(default_factory=ReplicaOptions)
    limits: RequestLimits = field(default_factory=RequestLimits)
    tracking_uri: str | None = None  # for models:/ URIs; None: MLFLOW_TRACKING_URI or sqlite:///<cwd>/runs/mlflow.db
    # Ray Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED=1 for the local Ray this job starts (user code and router on the
    # replica's main loop, no per-request logs to stderr, GC frozen after start): ~20% less CPU per request here
    throughput_optimized: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.teacher_steps < 1 or self.teacher_guidance < 1.0:
            raise ValueError(f"teacher_steps must be >= 1 and teacher_guidance >= 1 (1 = no CFG), got "
                             f"{self.teacher_steps}, {self.teacher_guidance}")
        self.student_options(), self.teacher_options()  # their own checks, before anything starts

    def student_options(self) -> ModelOptions:
        """The student's ``ModelOptions`` (1 step, no CFG)."""
        return ModelOptions(self.model, 1, 1.0, self.dtype, self.batch, self.replicas)

    def teacher_options(self) -> ModelOptions | None:
        """The teacher's ``ModelOptions``, or None when no teacher is served."""
        if not self.teacher:
            return None
        return ModelOptions(self.teacher, self.teacher_steps, self.teacher_guidance, self.dtype, self.teacher_batch,
                            self.teacher_replicas)


def deployment_options(model: ModelOptions, max_ongoing_extra: int = 0) -> dict[str, Any]:
    """``Deployment.options(**...)``: replicas or autoscaling, actor resources, and room for a full batch
    (Serve's default of 5 ongoing requests per replica would cap every batch at 5)."""
    r = model.replicas
    out: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
        "max_ongoing_requests": 2 * model.batch.max_batch_size + max_ongoing_extra,
    }
    if r.autoscaling:
        out["autoscaling_config"] = {"min_replicas": r.min_replicas, "max_replicas": r.max_replicas,
                                     "target_ongoing_requests": r.target_ongoing_requests}
    else:
        out["num_replicas"] = r.num_replicas
    return out


def ray_serve_env(cfg: ServeConfig, local: bool = True) -> dict[str, str]:
    """Environment for the Ray processes (controller, proxy, replicas) of a local Ray started for ``cfg``
    (``local=False``: what a cluster's own processes need in their pods' env).

    Serve reads these once, when each process imports it: set them before ``ray.init`` starts the local Ray
    (its workers inherit the driver's environment). With direct ingress a stopping replica keeps its port open
    for ``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S`` (Serve's default 30 s) so that a load balancer in
    front notices it is going; on the local Ray of one job nothing is in front, so the job's shutdown waits 1 s
    instead of 30 (a value already in the environment wins). A cluster keeps Serve's default.
    """
    if not cfg.throughput_optimized:
        return {}
    env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    if local:
        env[DRAIN_PERIOD_ENV] = os.environ.get(DRAIN_PERIOD_ENV, "1")
    return env
