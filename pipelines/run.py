"""Driver side of a distillation job: datasets, TorchTrainer, MLflow run, export registration."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from wadi_core import storage

from pipelines.checkpoint import prune_untracked_checkpoints
from pipelines.config import DistillConfig, absolute_paths, results_root
from pipelines.data import count_prompts, list_shards, prompt_dataset, pyarrow_filesystem
from pipelines.plan import resolve_prompts
from pipelines.tarshards import parse_prompt_tar
from pipelines.tracking import default_tracking_uri, git_sha, redact_uri, start_run
from pipelines.train import dataset_name, train_loop

__all__ = ["DistillResult", "run_distillation", "ray_job_ids", "fixed_prompts"]


@dataclass
class DistillResult:
    run_name: str
    tracking_uri: str
    mlflow_run_id: str | None
    export_uri: str
    checkpoint: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] | None = None

    def summary(self) -> str:
        lines = [
            f"run               {self.run_name}",
            f"steps             {self.metrics.get('step')}",
            f"last checkpoint   {self.checkpoint}",
            f"export            {self.export_uri}",
            f"MLflow            {redact_uri(self.tracking_uri)} (run {self.mlflow_run_id})",
        ]
        if self.model:
            lines.append(f"registered model  models:/{self.model['name']}@{self.model['alias']} "
                         f"(version {self.model['version']})")
        if self.tracking_uri.startswith("sqlite:"):
            lines.append(f"browse with       mlflow ui --backend-store-uri {self.tracking_uri}")
        return "\n".join(lines)


def ray_job_ids() -> dict[str, str]:
    """Ray job id (and the submission id under ``ray job submit``) for the MLflow tags."""
    import ray

    ids = {"ray.job_id": os.environ.get("RAY_JOB_ID") or ray.get_runtime_context().get_job_id()}
    try:
        meta = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata", {})
        if meta.get("job_submission_id"):
            ids["ray.submission_id"] = meta["job_submission_id"]
    except ValueError:
        pass
    return ids


def fixed_prompts(prompts_uri: str, n: int) -> list[str]:
    """The first ``n`` captions of the first shard: fixed prompts for comparable sample grids."""
    fs, paths = list_shards(prompts_uri)
    for path in paths:
        with fs.open_input_stream(path) as f:
            captions = parse_prompt_tar(f.read()).captions
        if captions:
            return captions[:n]
    return []


def _find_mlflow_run(tracking_uri: str, experiment: str, run_name: str) -> str | None:
    """The latest MLflow run of this Ray run name (rerunning a name resumes its MLflow run too)."""
    try:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`wadi.run_name` = '{run_name}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else None
    except Exception:  # noqa: BLE001 - an unreachable server is handled by start_run's warning
        return None


def _storage(uri: str) -> tuple[str, Any]:
    """RunConfig (storage_path, storage_filesystem): pyarrow S3 with the endpoint from the env."""
    if storage.is_remote(uri):
        fs, path = pyarrow_filesystem(uri)
        return path, fs
    return uri, None


def _trainer(cfg: DistillConfig, loop_config: dict[str, Any], datasets: dict[str, Any]) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = cfg.train
    resources = {"CPU": t.cpus_per_worker}
    if t.gpus_per_worker:
        resources["GPU"] = t.gpus_per_worker
    storage_path, storage_fs = _storage(t.storage_path)
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=t.run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep),
        ),
        datasets=datasets,
    )


def _check_cpu_headroom(cfg: DistillConfig, local: bool) -> None:
    """Ray Data needs CPUs beside the train workers, or the run hangs (``budget=(cpu=0.0``)."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    used = cfg.train.num_workers * cfg.train.cpus_per_worker
    if total - used >= 0.5:
        return
    msg = (f"train.num_workers x train.cpus_per_worker = {used:g} of the cluster's {total:g} CPUs leaves "
           "Ray Data no CPU to read prompts with (the run would hang): lower train.cpus_per_worker "
           f"(e.g. {max(0.1, (total - 1) / cfg.train.num_workers):.2g}) or add CPUs")
    if local:
        raise RuntimeError(msg)
    warnings.warn(msg + " (an autoscaling cluster may still add nodes)")


def run_distillation(cfg: DistillConfig, ray_address: str | None = None) -> DistillResult:
    """Run (or resume, same ``train.run_name``) one distillation job; returns where results are."""
    import ray

    root = results_root()
    cfg = absolute_paths(cfg, root)
    prompts_uri = resolve_prompts(cfg.data.prompts)
    num_prompts = cfg.data.num_prompts or count_prompts(prompts_uri)
    num_epochs = cfg.epochs_needed(num_prompts) if num_prompts else cfg.data.epochs
    tracking_uri = cfg.tracking.uri or default_tracking_uri(root / "runs")
    sample_prompts = fixed_prompts(prompts_uri, cfg.tracking.num_sample_prompts)

    started_here = False
    if not ray.is_initialized():
        address = ray_address or os.environ.get("RAY_ADDRESS") or None
        ray.init(address=address)
        started_here = address is None
    _check_cpu_headroom(cfg, local=started_here)
    datasets = {dataset_name(e): prompt_dataset(prompts_uri, cfg.data.shuffle_seed, e, cfg.data.read_tasks)
                for e in range(num_epochs)}
    spec = cfg.vsd.student
    tags = {
        "wadi.run_name": cfg.train.run_name, "wadi.recipe": cfg.recipe, "git.sha": git_sha(),
        "wadi.teacher": cfg.teacher, "wadi.adapter": f"{spec.kind} r={spec.rank} (fake {cfg.vsd.fake.kind} "
                                                     f"r={cfg.vsd.fake.rank})",
        "wadi.prompts": prompts_uri, **ray_job_ids(),
    }
    existing = _find_mlflow_run(tracking_uri, cfg.tracking.experiment, cfg.train.run_name)
    with start_run(cfg.tracking.experiment, run_name=cfg.train.run_name, tracking_uri=tracking_uri,
                   params=None if existing else {**cfg.to_flat(), "data.num_prompts_found": num_prompts},
                   tags=tags, run_id=existing) as tracker:
        loop_config = {
            "config": cfg.to_flat(), "mlflow_run_id": tracker.run_id, "tracking_uri": tracking_uri,
            "export_uri": cfg.export_uri, "sample_prompts": sample_prompts, "num_epochs": num_epochs,
            "total_steps": cfg.total_steps(num_prompts) if num_prompts else None,
        }
        result = _trainer(cfg, loop_config, datasets).fit()
        if result.error is not None:
            raise RuntimeError(f"distillation run {cfg.train.run_name} failed: {result.error}")
        prune_untracked_checkpoints(cfg.train.storage_path, cfg.train.run_name,
                                    [c.path for c, _ in (result.best_checkpoints or [])])
        model = None
        if tracker.active:
            from pipelines.registry import log_and_register

            local_export = storage.materialize(cfg.export_uri)
            tracker.log_artifacts(local_export, "export")
            model = log_and_register(local_export, cfg.tracking.registered_model, cfg.tracking.alias, tracking_uri)
            if model:
                tracker.set_tags({"wadi.registered_model": f"{model['name']}/{model['version']}"})
        elif cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"):
            warnings.warn("MLflow was unreachable: the export was not logged or registered")
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    return DistillResult(run_name=cfg.train.run_name, tracking_uri=tracking_uri, mlflow_run_id=tracker.run_id,
                         export_uri=cfg.export_uri, checkpoint=checkpoint, metrics=dict(result.metrics or {}),
                         model=model)
