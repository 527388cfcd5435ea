"""Typed configuration of a distillation job, loaded from a recipe YAML plus overrides.

Every check that can fail runs here, on the driver, before any Ray resources are requested:
an unknown recipe, a YAML syntax error (file and line), an unknown key, ZeRO stage 4, a batch
that does not split over the workers, out-of-range values (log_every, timesteps, learning rates,
ranks). Checks that need the outside world (teacher, tracking server, CPUs) are in
``pipelines.runtime.preflight``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from wadi_core.adapters import check_rank
from wadi_core.config import ConfigError, parse_overrides, to_flat_dict
from wadi_core.storage import is_remote, join
from wadi_core.vsd import VSDConfig

from pipelines.config.cli import load_job_config
from pipelines.evaluate.config import MOVED_KEYS, FinalEvaluationConfig
from pipelines.runtime.cluster import check_accelerator_type
from pipelines.runtime.shares import rank_slice
from pipelines.tracking.config import TrackingConfig

__all__ = [
    "DataConfig",
    "TrainConfig",
    "DebugConfig",
    "DistillConfig",
    "load_config",
    "parse_overrides",
    "results_root",
    "absolute_paths",
]

#: DDPM training timesteps of every supported teacher (SD 1.5 / 2.1, PixArt-alpha, the embedded one).
NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class DataConfig:
    """Where the prompts come from and how they are streamed."""

    prompts: str = "embedded"  # local folder or s3:// prefix of WebDataset shards; "embedded" = the domain lake
    shuffle_seed: int = 2023  # per-epoch file order = seed + epoch
    epochs: int = 1  # passes over the prompt lake
    max_steps: int = 0  # > 0 stops early (0 = run all epochs)
    num_prompts: int = 0  # known prompt count (plans without listing shards); 0 = count from the manifest
    # Where captions become text embeddings (pipelines/data/text_encoding.py): "trainer" = each train
    # worker runs the teacher's text encoder (CLIP is small next to the UNet); "actors" = a Ray Data
    # stage of its own actors streams embeddings (+ T5 masks) and the train workers never load the
    # text encoder (PixArt's T5-XXL: ~9.5 GB in bf16).
    text_encoding: Literal["trainer", "actors"] = "trainer"
    encoder_actors: int = 1  # text-encoder actors (actors mode)
    encoder_cpus_per_actor: float = 1.0  # CPUs of one text-encoder actor (actors mode)
    encoder_gpus_per_actor: float = 0.0  # fractional is fine: e.g. 0.5 = two actors per GPU
    encoder_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights and streamed embeddings (bf16 on CPU: AVX512-BF16 / AMX only)
    encoder_batch_size: int = 64  # captions per encoder call
    read_tasks: int = 0  # Ray Data read parallelism (0 = one task per shard)
    max_caption_bytes: int = 16 * 1024  # longer captions are dropped and counted (data/bad_too_long)
    max_shard_bytes: int = 1 << 30  # larger shards are skipped (each is read whole into memory)

    def __post_init__(self) -> None:
        if self.max_caption_bytes < 1 or self.max_shard_bytes < 1024:
            raise ConfigError(f"data.max_caption_bytes must be >= 1 and data.max_shard_bytes >= 1024, got "
                              f"{self.max_caption_bytes} and {self.max_shard_bytes}")
        if self.read_tasks < 0 or self.num_prompts < 0:
            raise ConfigError("data.read_tasks and data.num_prompts must be >= 0 (0 = automatic)")
        if self.encoder_actors < 1 or self.encoder_cpus_per_actor <= 0 or self.encoder_batch_size < 1:
            raise ConfigError("data.encoder_actors and data.encoder_batch_size must be >= 1 and "
                              "data.encoder_cpus_per_actor > 0")
        g = self.encoder_gpus_per_actor
        if g < 0 or (g > 1 and g != int(g)):
            raise ConfigError(f"data.encoder_gpus_per_actor={g:g}: use 0 (CPU), a fraction of one GPU or a whole number")
        if self.encoder_dtype == "float16" and g == 0:
            raise ConfigError("data.encoder_dtype=float16 needs GPUs (data.encoder_gpus_per_actor > 0): "
                              "use float32 or bfloat16 on CPU")
        if self.epochs < 1:
            raise ConfigError(f"data.epochs must be >= 1, got {self.epochs}")
        if self.max_steps < 0:
            raise ConfigError(f"data.max_steps must be >= 0, got {self.max_steps}")
        if self.epochs > 16:
            raise ConfigError(
                f"data.epochs={self.epochs}: each epoch is its own Ray dataset (own file order); "
                "use data.max_steps for long runs on a small prompt lake, or at most 16 epochs"
            )


@dataclass(frozen=True)
class TrainConfig:
    """World size, resources, DeepSpeed and checkpoints."""

    run_name: str = "wadi-embedded"  # name of the run: its folder under storage_path and its MLflow run name
    global_batch: int = 32  # prompts per optimizer step over all workers
    num_workers: int = 2  # Ray Train workers (data-parallel ranks); with min_workers: the most
    # Elastic training (0: off, a fixed num_workers): go on with as few as min_workers after a node is
    # lost, grow back to num_workers when nodes return; checkpoints then resume at any world size
    min_workers: int = 0
    # Elastic: seconds between Ray Train's checks for room to grow back (ScalingConfig.elastic_resize_monitor_interval_s)
    resize_check_s: float = 60.0
    # Elastic: seconds Ray Train waits for a worker group to start before it gives up on that size and
    # tries the workers that fit (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S; Ray's default is 60)
    worker_start_timeout_s: float = 30.0
    cpus_per_worker: float = 0.5  # fractional on a small CPU node, so Ray Data keeps CPUs to read with
    gpus_per_worker: float = 0.0  # GPUs per train worker (0: CPU)
    # Ray accelerator type of the training GPUs (A100, H100 ...; "" = any): keeps the workers off
    # other GPU nodes of a shared cluster, e.g. the spot evaluation nodes (ScalingConfig).
    accelerator_type: str = ""
    zero_stage: int = 2  # precision and gradient checkpointing: vsd.mixed_precision, vsd.gradient_checkpointing
    checkpoint_every: int = 50  # steps; 0 = only at the end
    keep: int = 2  # checkpoints kept in storage
    storage_path: str = "./runs/ray"  # local folder or s3://bucket/prefix (Ray RunConfig.storage_path)
    max_failures: int = 2  # worker-group restarts (FailureConfig)
    seed: int = 0  # seed of the adapters' init and the per-rank noise
    log_every: int = 1  # steps between metric logs
    max_nonfinite_in_a_row: int = 5  # non-finite VSD steps (skipped) in a row that stop the run (0: never)

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(
                f"train.zero_stage={self.zero_stage}: DeepSpeed ZeRO has stages 0, 1, 2 and 3 "
                "(0 = plain data parallel, 2 = shard optimizer state + gradients, 3 = also parameters)"
            )
        if self.num_workers < 1:
            raise ConfigError(f"train.num_workers must be >= 1, got {self.num_workers}")
        if self.global_batch < self.num_workers:
            raise ConfigError(f"train.global_batch={self.global_batch} gives some of the train.num_workers="
                              f"{self.num_workers} ranks no prompt: use a global batch of at least {self.num_workers}")
        if not self.elastic and self.global_batch % self.num_workers:  # elastic: uneven shares (rank_slice)
            raise ConfigError(
                f"train.global_batch={self.global_batch} does not split evenly over "
                f"train.num_workers={self.num_workers}: pick a global batch that is a multiple of the "
                f"worker count (e.g. {max(1, self.global_batch // self.num_workers) * self.num_workers})"
            )
        self._check_world_sizes()
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ConfigError("train.cpus_per_worker must be > 0 and train.gpus_per_worker >= 0")
        check_accelerator_type(self.accelerator_type, self.gpus_per_worker, "train.accelerator_type",
                               "train.gpus_per_worker")
        if self.checkpoint_every < 0 or self.keep < 1:
            raise ConfigError("train.checkpoint_every must be >= 0 and train.keep >= 1")
        if not self.run_name or "/" in self.run_name:
            raise ConfigError(f"train.run_name={self.run_name!r} must be a non-empty name without '/'")
        if self.log_every < 1:
            raise ConfigError(f"train.log_every must be >= 1 (steps between metric logs), got {self.log_every}")
        if self.max_failures < 0:
            raise ConfigError(f"train.max_failures must be >= 0, got {self.max_failures}")
        if self.max_nonfinite_in_a_row < 0:
            raise ConfigError(f"train.max_nonfinite_in_a_row must be >= 0 (0: never stop), "
                              f"got {self.max_nonfinite_in_a_row}")

    def _check_world_sizes(self) -> None:
        """min_workers between 0 (a fixed size) and num_workers; the resize timings positive."""
        if not 0 <= self.min_workers <= self.num_workers:
            raise ConfigError(f"train.min_workers={self.min_workers} must be between 0 (fixed size) and "
                              f"train.num_workers={self.num_workers}")
        if self.resize_check_s <= 0 or self.worker_start_timeout_s <= 0:
            raise ConfigError("train.resize_check_s and train.worker_start_timeout_s must be > 0 (seconds)")

    @property
    def elastic(self) -> bool:
        """Whether the run may change its world size (``min_workers`` below ``num_workers``)."""
        return 0 < self.min_workers < self.num_workers

    @property
    def world_sizes(self) -> range:
        """The world sizes this run may train at."""
        return range(self.min_workers if self.elastic else self.num_workers, self.num_workers + 1)

    @property
    def per_worker_batch(self) -> int:
        """Prompts per rank at the full world size."""
        return self.global_batch // self.num_workers

    def rank_slice(self, rank: int, world: int) -> tuple[int, int]:
        """``[start, stop)`` of rank ``rank``'s share of each global batch at world size ``world``: the
        global batch is the same at every size (an uneven split weights the losses by sample count)."""
        if world not in self.world_sizes:
            raise ValueError(f"world size {world} is outside train.min_workers..train.num_workers "
                             f"({self.world_sizes.start}..{self.num_workers})")
        return rank_slice(self.global_batch, rank, world)


@dataclass(frozen=True)
class DebugConfig:
    """Fault injection for tests: rank ``fail_rank`` exits at ``fail_at_step`` once (marker file);
    rank ``nan_rank`` (-1: every rank) gets NaN text embeddings at step ``nan_at_step`` (0: never);
    every rank waits before step ``pause_at_step`` until the file ``pause_until`` exists (a test
    acts on a run at a known step, then lets it go on; ``<pause_until>.waiting`` says a rank is there)."""

    fail_rank: int = -1  # rank that exits once at fail_at_step (-1: none)
    fail_at_step: int = 0  # step at which fail_rank exits (0: never)
    fail_marker: str = ""  # file that marks the injected failure as done (it happens once)
    nan_rank: int = -1  # rank that gets NaN text embeddings at nan_at_step (-1: every rank)
    nan_at_step: int = 0  # step of the NaN text embeddings (0: never)
    pause_at_step: int = 0  # every rank waits before this step (0: never) ...
    pause_until: str = ""  # ... until this file exists


@dataclass(frozen=True)
class DistillConfig:
    """One distillation job."""

    recipe: str = "embedded"  # recipe name this config came from (set by --config)
    teacher: str = "embedded"  # diffusers dir, s3:// prefix, hub id, or "embedded"
    # Denoiser architecture for --dry-run without weights: a wadi_core.models.DENOISER_CONFIGS name
    # ("sd15", "sd21-base", "pixart-256"); "" = read the config from the teacher directory.
    architecture: str = ""
    vsd: VSDConfig = field(default_factory=VSDConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    evaluation: FinalEvaluationConfig = field(default_factory=FinalEvaluationConfig)
    export_dir: str = ""  # "" = <storage_path>/<run_name>/export

    def __post_init__(self) -> None:
        if self.vsd.mixed_precision == "fp16" and self.train.gpus_per_worker == 0:
            raise ConfigError("vsd.mixed_precision=fp16 needs GPUs (the GPU recipes' mode; fp16 kernels on the CPU "
                              "are slow or missing): use bf16 or no")
        if self.vsd.student_ema and self.train.zero_stage == 3:
            raise ConfigError("vsd.student_ema needs train.zero_stage <= 2 (ZeRO-3 partitions the student's "
                              "parameters across ranks): use zero_stage 2 or vsd.student_ema=0")
        if self.vsd.student_timestep < 1:
            raise ConfigError("vsd.student_timestep must be the last training timestep (e.g. 999)")
        if self.train.elastic:
            self._check_elastic()
        n = NUM_TRAIN_TIMESTEPS
        if not self.vsd.t_max < n or not self.vsd.student_timestep < n:
            raise ConfigError(
                f"vsd.t_max={self.vsd.t_max} and vsd.student_timestep={self.vsd.student_timestep} must be < the "
                f"teacher's num_train_timesteps ({n}): e.g. vsd.t_max=980, vsd.student_timestep={n - 1}"
            )

    def _check_elastic(self) -> None:
        """What an elastic run (train.min_workers) cannot carry across a resize."""
        if self.train.zero_stage == 3 or self.vsd.optimizer != "adamw":
            raise ConfigError(
                f"train.min_workers={self.train.min_workers} (elastic) checkpoints the full adapters and AdamW "
                f"moments, which needs train.zero_stage <= 2 and vsd.optimizer=adamw (got zero_stage "
                f"{self.train.zero_stage}, optimizer {self.vsd.optimizer}): change those, or set train.min_workers=0")
        if self.data.text_encoding == "actors":
            raise ConfigError(
                f"train.min_workers={self.train.min_workers} (elastic): every rank reads the epoch's whole prompt "
                "order and takes its slice of each global batch, so with data.text_encoding=actors every prompt "
                "would be encoded once per rank: use data.text_encoding=trainer, or set train.min_workers=0")

    @property
    def export_uri(self) -> str:
        return self.export_dir or join(self.train.storage_path, self.train.run_name, "export")

    def steps_per_epoch(self, num_prompts: int) -> int:
        """Optimizer steps per epoch (the last partial global batch is dropped)."""
        return num_prompts // self.train.global_batch

    def total_steps(self, num_prompts: int) -> int:
        total = self.steps_per_epoch(num_prompts) * self.data.epochs
        return min(total, self.data.max_steps) if self.data.max_steps else total

    def epochs_needed(self, num_prompts: int) -> int:
        """Epochs actually touched (max_steps may stop early)."""
        per = self.steps_per_epoch(num_prompts)
        if not self.data.max_steps or per == 0:
            return self.data.epochs
        return min(self.data.epochs, math.ceil(self.data.max_steps / per))

    def to_flat(self) -> dict[str, Any]:
        return to_flat_dict(self)


def check_adapter_ranks(data: Mapping[str, Any]) -> None:
    """The adapters' one rank rule (``wadi_core.adapters.check_rank``), reported with the config key:
    a recipe's ``rank: 32`` left in place under ``vsd.student.kind=full`` fails here, not in a worker."""
    vsd = data.get("vsd")
    if not isinstance(vsd, Mapping):
        return
    for role in ("student", "fake"):
        spec = vsd.get(role)
        if isinstance(spec, Mapping) and "kind" in spec and spec.get("rank") is not None:
            try:
                check_rank(spec["kind"], spec["rank"])
            except ValueError as e:
                raise ConfigError(f"vsd.{role}: {e} (vsd.{role}.rank)") from None


def check_moved_evaluation_keys(data: Mapping[str, Any]) -> None:
    """The ``evaluation:`` keys that moved into the evaluation protocol's sections say where to."""
    ev = data.get("evaluation")
    moved = [k for k in ev if k in MOVED_KEYS] if isinstance(ev, Mapping) else []
    if moved:
        raise ConfigError("; ".join(f"evaluation.{k} is now evaluation.{MOVED_KEYS[k]}" for k in moved)
                          + " (the same keys as jobs/evaluate.py): rename it in the recipe or override")


def check_distill_config(data: Mapping[str, Any]) -> None:
    """The checks on the merged mapping of a distillation job, before it is built."""
    check_moved_evaluation_keys(data)
    check_adapter_ranks(data)


def load_config(recipe: str = "embedded", overrides: Mapping[str, Any] | Sequence[str] = ()) -> DistillConfig:
    """Recipe YAML (name in ``recipes/`` or a path) + dotted overrides -> validated ``DistillConfig``."""
    return load_job_config(DistillConfig, recipe, overrides, check=check_distill_config, whole_recipe=True)


def results_root() -> Path:
    """Where relative local paths of a job resolve: ``$WADI_HOME``; under ``ray job submit`` (whose
    working directory is a temporary copy) ``~/wadi``; else the current directory."""
    if os.environ.get("WADI_HOME"):
        return Path(os.environ["WADI_HOME"]).expanduser().resolve()
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        return Path.home() / "wadi"
    return Path.cwd()


def absolute_paths(cfg: DistillConfig, root: Path) -> DistillConfig:
    """Relative local paths -> absolute (Ray workers run in other working directories)."""
    def fix(p: str) -> str:
        if not p or is_remote(p) or p == "embedded" or Path(p).expanduser().is_absolute():
            return p
        return str((root / p).resolve())

    teacher = cfg.teacher if cfg.teacher == "embedded" or not Path(cfg.teacher).exists() else fix(cfg.teacher)
    return dataclasses.replace(
        cfg, teacher=teacher, export_dir=fix(cfg.export_dir),
        data=dataclasses.replace(cfg.data, prompts=fix(cfg.data.prompts)),
        train=dataclasses.replace(cfg.train, storage_path=fix(cfg.train.storage_path)),
        evaluation=dataclasses.replace(cfg.evaluation, reference=fix(cfg.evaluation.reference)),
    )
