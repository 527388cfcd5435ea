"""The tracking section of a training job: which MLflow server and experiment, the registered
model, how often to sample (``tracking:`` in a recipe)."""

from __future__ import annotations

from dataclasses import dataclass

from wadi_core.config import ConfigError

__all__ = ["TrackingConfig"]


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: where, which experiment, which registered model, how often to sample."""

    uri: str = ""  # "" = MLFLOW_TRACKING_URI, else sqlite:///<cwd>/runs/mlflow.db
    experiment: str = "wadi"  # MLflow experiment of the training run
    registered_model: str = "wadi-embedded"  # registry name of the exported one-step student
    alias: str = "candidate"  # registry alias set on the new version
    sample_every: int = 50  # steps between sample grids (0 = only at the end)
    num_sample_prompts: int = 8  # prompts (images) in a sample grid
    # An explicitly set server (uri or MLFLOW_TRACKING_URI) that is down or refuses the credentials
    # stops the job before Ray starts; false = warn and run untracked (pipelines.runtime.preflight).
    require_server: bool = True

    def __post_init__(self) -> None:
        if self.sample_every < 0 or self.num_sample_prompts < 0:
            raise ConfigError("tracking.sample_every and tracking.num_sample_prompts must be >= 0")
