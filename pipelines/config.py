"""Typed configuration of a distillation job, loaded from a recipe YAML plus overrides.

Every check that can fail runs here, on the driver, before any Ray resources are requested:
an unknown recipe, an unknown key, ZeRO stage 4, a batch that does not split over the workers.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from wadi_core.config import ConfigError, from_dict, to_flat_dict, unflatten
from wadi_core.storage import is_remote
from wadi_core.vsd import VSDConfig

__all__ = [
    "RECIPES_DIR",
    "DataConfig",
    "TrainConfig",
    "TrackingConfig",
    "DebugConfig",
    "DistillConfig",
    "available_recipes",
    "read_recipe",
    "load_config",
    "parse_overrides",
    "results_root",
    "absolute_paths",
]

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


@dataclass(frozen=True)
class DataConfig:
    """Where the prompts come from and how they are streamed."""

    prompts: str = "embedded"  # local folder or s3:// prefix of WebDataset shards; "embedded" = the domain lake
    shuffle_seed: int = 2023  # per-epoch file order = seed + epoch
    epochs: int = 1
    max_steps: int = 0  # > 0 stops early (0 = run all epochs)
    num_prompts: int = 0  # known prompt count (plans without listing shards); 0 = count from the manifest
    # Text encoding runs in the train worker (see pipelines/data.py for why); Ray Data streams strings.
    text_encoding: Literal["worker"] = "worker"
    read_tasks: int = 0  # Ray Data read parallelism (0 = one task per shard)

    def __post_init__(self) -> None:
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

    run_name: str = "wadi-embedded"
    global_batch: int = 32
    num_workers: int = 2
    cpus_per_worker: float = 0.5  # fractional on a small CPU node, so Ray Data keeps CPUs to read with
    gpus_per_worker: float = 0.0
    zero_stage: int = 2  # precision and gradient checkpointing: vsd.mixed_precision, vsd.gradient_checkpointing
    checkpoint_every: int = 50  # steps; 0 = only at the end
    keep: int = 2  # checkpoints kept in storage
    storage_path: str = "./runs/ray"  # local folder or s3://bucket/prefix (Ray RunConfig.storage_path)
    max_failures: int = 2  # worker-group restarts (FailureConfig)
    seed: int = 0
    log_every: int = 1

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(
                f"train.zero_stage={self.zero_stage}: DeepSpeed ZeRO has stages 0, 1, 2 and 3 "
                "(0 = plain data parallel, 2 = shard optimizer state + gradients, 3 = also parameters)"
            )
        if self.num_workers < 1:
            raise ConfigError(f"train.num_workers must be >= 1, got {self.num_workers}")
        if self.global_batch < 1 or self.global_batch % self.num_workers:
            raise ConfigError(
                f"train.global_batch={self.global_batch} does not split evenly over "
                f"train.num_workers={self.num_workers}: pick a global batch that is a multiple of the "
                f"worker count (e.g. {max(1, self.global_batch // self.num_workers) * self.num_workers})"
            )
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ConfigError("train.cpus_per_worker must be > 0 and train.gpus_per_worker >= 0")
        if self.checkpoint_every < 0 or self.keep < 1:
            raise ConfigError("train.checkpoint_every must be >= 0 and train.keep >= 1")
        if not self.run_name or "/" in self.run_name:
            raise ConfigError(f"train.run_name={self.run_name!r} must be a non-empty name without '/'")

    @property
    def per_worker_batch(self) -> int:
        return self.global_batch // self.num_workers


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: where, which experiment, which registered model, how often to sample."""

    uri: str = ""  # "" = MLFLOW_TRACKING_URI, else sqlite:///<cwd>/runs/mlflow.db
    experiment: str = "wadi"
    registered_model: str = "wadi-embedded"
    alias: str = "candidate"
    sample_every: int = 50  # steps between sample grids (0 = only at the end)
    num_sample_prompts: int = 8


@dataclass(frozen=True)
class DebugConfig:
    """Fault injection for tests: rank ``fail_rank`` exits at ``fail_at_step`` once (marker file)."""

    fail_rank: int = -1
    fail_at_step: int = 0
    fail_marker: str = ""


@dataclass(frozen=True)
class DistillConfig:
    """One distillation job."""

    recipe: str = "embedded"
    teacher: str = "embedded"  # diffusers dir, s3:// prefix, hub id, or "embedded"
    # Denoiser architecture for --dry-run without weights: a wadi_core.models.DENOISER_CONFIGS name
    # ("sd15", "sd21-base", "pixart-256"); "" = read the config from the teacher directory.
    architecture: str = ""
    vsd: VSDConfig = field(default_factory=VSDConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    export_dir: str = ""  # "" = <storage_path>/<run_name>/export

    def __post_init__(self) -> None:
        if self.vsd.mixed_precision == "fp16" and self.train.gpus_per_worker == 0:
            raise ConfigError("vsd.mixed_precision=fp16 needs GPUs (DeepSpeed on CPU has no fp16): use bf16 or no")
        if self.vsd.student_timestep < 1:
            raise ConfigError("vsd.student_timestep must be the last training timestep (e.g. 999)")

    @property
    def export_uri(self) -> str:
        from wadi_core.storage import join

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


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def read_recipe(recipe: str) -> tuple[str, dict[str, Any]]:
    """A recipe (name in ``recipes/`` or a path to a .yaml file) -> (name, parsed mapping)."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") and path.exists():
        name = path.stem
    else:
        path = RECIPES_DIR / f"{recipe}.yaml"
        name = recipe
        if not path.exists():
            raise ConfigError(
                f"unknown recipe {recipe!r}: pass one of {available_recipes()} or a path to a .yaml file"
            )
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping, got {type(data).__name__}")
    return name, data


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["train.zero_stage=3", "vsd.guidance_real=2"]`` -> dotted dict (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.zero_stage=2)")
        out[key.strip()] = yaml.safe_load(value) if value != "" else ""
    return out


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(recipe: str = "embedded", overrides: Mapping[str, Any] | Sequence[str] = ()) -> DistillConfig:
    """Recipe YAML (name in ``recipes/`` or a path) + dotted overrides -> validated ``DistillConfig``."""
    name, data = read_recipe(recipe)
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(list(overrides))
    data = _merge(data, unflatten(dict(overrides)))
    data.setdefault("recipe", name)
    return from_dict(DistillConfig, data)


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
    )
