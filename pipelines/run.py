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
from pipelines.cluster import check_accelerator_available, init_ray, local_cpus
from pipelines.cluster import ray_address as resolve_ray_address
from pipelines.preflight import check_cpu_headroom, preflight
from pipelines.tracking import default_tracking_uri, git_sha, redact, redact_uri, start_run
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
    evaluation: dict[str, Any] | None = None  # pipelines.final_eval: teacher vs student table

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
        if self.tracking_uri.startswith("sqlite:"):  # a local file: no user info to redact
            lines.append(f"browse with       mlflow ui --backend-store-uri {self.tracking_uri}")
        if self.evaluation:
            lines += ["", self.evaluation["table"], f"grids             {self.evaluation['teacher_out']}/grid.png | "
                      f"{self.evaluation['student_out']}/grid.png"]
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


def _trainer(cfg: DistillConfig, loop_config: dict[str, Any], datasets: dict[str, Any],
             worker_resources: dict[str, float] | None = None, placement_strategy: str = "PACK") -> Any:
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = cfg.train
    resources = {"CPU": t.cpus_per_worker, **(worker_resources or {})}
    if t.gpus_per_worker:
        resources["GPU"] = t.gpus_per_worker
    # preserve_order: Ray Data hands each worker the same rows on every attempt (its splitter
    # then ignores locality and deals blocks in order), so resume skips exactly what was trained.
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    storage_path, storage_fs = _storage(t.storage_path)
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.gpus_per_worker > 0,
                                     resources_per_worker=resources, placement_strategy=placement_strategy,
                                     accelerator_type=t.accelerator_type or None),
        dataset_config=DataConfig(execution_options=ingest),
        run_config=RunConfig(
            name=t.run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep),
        ),
        datasets=datasets,
    )


def run_distillation(cfg: DistillConfig, ray_address: str | None = None, *,
                     worker_resources: dict[str, float] | None = None,
                     placement_strategy: str = "PACK") -> DistillResult:
    """Run (or resume, same ``train.run_name``) one distillation job; returns where results are.

    Ray is joined only at ``ray_address`` / ``RAY_ADDRESS``; otherwise a local Ray is started.
    ``pipelines.preflight`` runs first: a bad teacher, tracking server or CPU layout raises
    ``ConfigError`` before any Ray resources are requested. ``worker_resources`` (custom Ray
    resources added to each worker's, e.g. one ``{"trainer_slot": 1}`` per node) and
    ``placement_strategy`` (``PACK`` / ``SPREAD`` / ``STRICT_SPREAD``) place the workers on a cluster.
    """
    import ray

    root = results_root()
    cfg = absolute_paths(cfg, root)
    start_local = not ray.is_initialized() and resolve_ray_address(ray_address) == "local"
    preflight(cfg, local_cpus=local_cpus() if start_local else None)
    prompts_uri = resolve_prompts(cfg.data.prompts)
    num_prompts = cfg.data.num_prompts or count_prompts(prompts_uri)
    num_epochs = cfg.epochs_needed(num_prompts) if num_prompts else cfg.data.epochs
    tracking_uri = cfg.tracking.uri or default_tracking_uri(root / "runs")
    sample_prompts = fixed_prompts(prompts_uri, cfg.tracking.num_sample_prompts)

    started_here = init_ray(ray_address, num_cpus=local_cpus())
    # Joined or already running: check the CPUs Ray really has (a remote cluster may autoscale).
    joined_remote = not started_here and resolve_ray_address(ray_address) != "local"
    check_cpu_headroom(cfg, ray.cluster_resources().get("CPU", 0.0), strict=not joined_remote)
    check_accelerator_available(cfg.train.accelerator_type, ray.cluster_resources(), "train.accelerator_type",
                                strict=not joined_remote)
    datasets = {dataset_name(e): prompt_dataset(prompts_uri, cfg.data.shuffle_seed, e, cfg.data.read_tasks,
                                                max_caption_bytes=cfg.data.max_caption_bytes,
                                                max_shard_bytes=cfg.data.max_shard_bytes)
                for e in range(num_epochs)}
    text_conds = None
    if cfg.data.text_encoding == "actors":  # text-encoder actors feed the workers (pipelines/text_encoding.py)
        from pipelines.text_encoding import encode_stage, precompute_conds

        datasets = {name: encode_stage(ds, cfg) for name, ds in datasets.items()}
        text_conds = precompute_conds(cfg, ["", *sample_prompts])
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
            "total_steps": cfg.total_steps(num_prompts) if num_prompts else None, "text_conds": text_conds,
        }
        result = _trainer(cfg, loop_config, datasets, worker_resources, placement_strategy).fit()
        if result.error is not None:
            raise RuntimeError(redact(f"distillation run {cfg.train.run_name} failed: {result.error}"))
        prune_untracked_checkpoints(cfg.train.storage_path, cfg.train.run_name,
                                    [c.path for c, _ in (result.best_checkpoints or [])])
        model = None
        if tracker.active:
            from pipelines.registry import log_and_register

            local_export = storage.materialize(cfg.export_uri)
            # One copy in MLflow: the logged model (its "pipeline" artifact is the export); the run
            # points at it instead of holding the same files again as run artifacts.
            model = log_and_register(local_export, cfg.tracking.registered_model, cfg.tracking.alias, tracking_uri)
            if model:
                tracker.set_tags({"wadi.registered_model": f"{model['name']}/{model['version']}",
                                  "wadi.export_model_uri": model["model_uri"]})
        elif cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"):
            warnings.warn("MLflow was unreachable: the export was not logged or registered")
    from pipelines.final_eval import final_evaluation

    # After the training run is closed: the evaluation nests its own run under it, then adds final/*.
    evaluation = final_evaluation(cfg, cfg.export_uri, tracker.run_id if tracker.active else None, root,
                                  tracking_uri=tracking_uri, step=(result.metrics or {}).get("step"))
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    return DistillResult(run_name=cfg.train.run_name, tracking_uri=tracking_uri, mlflow_run_id=tracker.run_id,
                         export_uri=cfg.export_uri, checkpoint=checkpoint, metrics=dict(result.metrics or {}),
                         model=model, evaluation=evaluation)
