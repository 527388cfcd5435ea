"""Driver side of a distillation job: datasets, TorchTrainer, MLflow run, export registration."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any

from wadi_core import storage
from wadi_core.config import ConfigError
from wadi_core.redact import redact
from wadi_core.storage import is_storage_full

from pipelines.config.cli import format_config
from pipelines.config.job import DistillConfig, absolute_paths, results_root
from pipelines.data.prompts import count_prompts, exact_split, lake_captions, prompt_dataset, resolve_prompts
from pipelines.data.text_encoding import encode_stage, precompute_conds
from pipelines.evaluate.final import final_evaluation
from pipelines.runtime.cluster import check_accelerator_available, init_ray, local_cpus
from pipelines.runtime.cluster import ray_address as resolve_ray_address
from pipelines.runtime.console import say
from pipelines.runtime.lease import RunLease
from pipelines.runtime.preflight import check_cpu_headroom, preflight
from pipelines.runtime.stop import RunInterrupted, StopFlag, call_in_thread, stop_on_signals
from pipelines.tracking.client import default_tracking_uri, git_sha, redact_uri, start_run
from pipelines.train.checkpoint import (checkpoint_step, latest_complete_checkpoint, prune_untracked_checkpoints,
                                        repair_ray_snapshot, run_storage)
from pipelines.train.worker import dataset_name, train_loop

__all__ = ["DistillResult", "RunFailed", "run_distillation", "ray_job_ids", "fixed_prompts", "check_lake",
           "headline_params", "HEADLINE_PARAMS"]


@dataclass
class DistillResult:
    run_name: str
    tracking_uri: str
    mlflow_run_id: str | None
    export_uri: str
    checkpoint: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None  # pipelines.evaluate.final: teacher vs student table
    mlflow_experiment_id: str | None = None

    def run_page(self, ui: str = "http://127.0.0.1:5000") -> str | None:
        """The training run's page in the MLflow UI (``ui``: where it is served): the run itself,
        not MLflow 3's experiment page, which opens on its GenAI traces view."""
        if not (self.mlflow_run_id and self.mlflow_experiment_id):
            return None
        base = self.tracking_uri if self.tracking_uri.startswith(("http://", "https://")) else ui
        return f"{redact_uri(base).rstrip('/')}/#/experiments/{self.mlflow_experiment_id}/runs/{self.mlflow_run_id}"

    def summary(self) -> str:
        lines = [
            f"run               {self.run_name}",
            f"steps             {self.metrics.get('step')}",
            f"last checkpoint   {self.checkpoint}",
            f"export            {self.export_uri}",
            f"MLflow            {redact_uri(self.tracking_uri)} (run {self.mlflow_run_id})",
        ]
        if "perf/data_wait_share_job" in self.metrics:
            lines.insert(2, f"data wait         {100 * self.metrics['perf/data_wait_share_job']:.2f} % of step time "
                            "(steps waiting for prompts; each epoch's first step left out)")
        if self.model:
            lines.append(f"registered model  models:/{self.model['name']}@{self.model['alias']} "
                         f"(version {self.model['version']})")
        if self.tracking_uri.startswith("sqlite:"):  # a local file: no user info to redact
            lines.append(f"browse with       mlflow ui --backend-store-uri {self.tracking_uri}")
        page = self.run_page()
        if page:
            lines.append(f"run page          {page}")
        if self.evaluation:
            lines += ["", self.evaluation["table"], f"grids             {self.evaluation['teacher_out']}/grid.png | "
                      f"{self.evaluation['student_out']}/grid.png"]
        return "\n".join(lines)


def ray_job_ids() -> dict[str, str]:
    """Ray job id (and the submission id under ``ray job submit``) for the MLflow tags."""
    import ray  # noqa: PLC0415 -- Ray only on the cluster path

    ids = {"ray.job_id": os.environ.get("RAY_JOB_ID") or ray.get_runtime_context().get_job_id()}
    try:
        meta = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata", {})
        if meta.get("job_submission_id"):
            ids["ray.submission_id"] = meta["job_submission_id"]
    except ValueError:
        pass
    return ids


class RunFailed(RuntimeError):
    """The distillation ran but failed, or trained nothing: nothing was registered."""


def fixed_prompts(prompts_uri: str, n: int) -> list[str]:
    """The first ``n`` captions of the lake (shards in name order): fixed prompts for comparable
    sample grids."""
    return lake_captions(prompts_uri, n)[0]


def check_lake(cfg: DistillConfig, prompts_uri: str) -> tuple[int | None, list[str]]:
    """Before Ray starts: the lake exists and can fill one global batch (else the run would end
    "successfully" after 0 steps). Returns (the manifest's prompt count or None, sample prompts)."""
    d, batch = cfg.data, cfg.train.global_batch
    shown = redact(prompts_uri)
    try:
        num_prompts = d.num_prompts or count_prompts(prompts_uri)
        if num_prompts is not None and num_prompts < batch:
            raise ConfigError(f"the prompt lake {shown} holds {num_prompts} prompts "
                              f"({'data.num_prompts' if d.num_prompts else 'its manifest.json'}), fewer than one global "
                              f"batch (train.global_batch={batch}): the run would train 0 steps. Add prompts, or "
                              "lower train.global_batch")
        captions, _, listed = lake_captions(prompts_uri, max(batch, cfg.tracking.num_sample_prompts),
                                               d.max_caption_bytes, d.max_shard_bytes)
    except FileNotFoundError as e:
        raise ConfigError(f"data.prompts={shown}: {redact(str(e))}") from None
    if len(captions) < batch:
        raise ConfigError(f"the prompt lake {shown} has {len(captions)} readable prompts in its {listed} shard(s), "
                          f"fewer than one global batch (train.global_batch={batch}): the run would train 0 steps. "
                          "Check the shards (corrupt or unreadable ones hold no prompts; write them with "
                          "wadi_core.prompts), add prompts, or lower train.global_batch")
    return num_prompts, captions[:cfg.tracking.num_sample_prompts]


#: The run's headline params (the MLflow run page lists them); the whole resolved config is the
#: run's ``config.yaml`` artifact (``--print-config`` of the same job).
HEADLINE_PARAMS = ("recipe", "teacher", "vsd.loss", "vsd.gen_lr", "vsd.fake_lr", "vsd.mixed_precision", "data.prompts",
                   "train.global_batch", "train.num_workers", "train.min_workers", "train.zero_stage",
                   "train.storage_path")


def headline_params(cfg: DistillConfig, num_prompts: int | None) -> dict[str, Any]:
    flat = cfg.to_flat()
    spec, fake = cfg.vsd.student, cfg.vsd.fake
    return {**{k: flat[k] for k in HEADLINE_PARAMS}, "adapters": f"{spec.kind} r={spec.rank} / fake {fake.kind} "
            f"r={fake.rank}", "steps": cfg.total_steps(num_prompts) if num_prompts else cfg.data.max_steps or "epochs",
            "data.num_prompts_found": num_prompts}


def _find_mlflow_run(tracking_uri: str, experiment: str, run_name: str, storage_path: str) -> str | None:
    """The latest MLflow run of this Ray run name (rerunning a name resumes its MLflow run too).
    Raises ``ConfigError`` when that run recorded another ``train.storage_path``: it belongs to
    another run that shares the name, whose page this job would overwrite."""
    try:
        import mlflow  # noqa: PLC0415 -- MLflow is optional and slow to import

        client = mlflow.MlflowClient(tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`wadi.run_name` = '{run_name}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
    except Exception:  # noqa: BLE001 - an unreachable server is handled by start_run's warning
        return None
    if not runs:
        return None
    recorded = runs[0].data.params.get("train.storage_path")
    if recorded is not None and recorded != redact(storage_path):
        raise ConfigError(
            f"MLflow run {runs[0].info.run_id} (experiment {experiment!r}) is run {run_name!r} with "
            f"train.storage_path={recorded}, but this job stores it in {redact(storage_path)}: it would log into "
            "the other run's page. Use another train.run_name (or tracking.experiment), or the same storage path")
    return runs[0].info.run_id


def _trainer(cfg: DistillConfig, loop_config: dict[str, Any], datasets: dict[str, Any],
             worker_resources: dict[str, float] | None = None, placement_strategy: str = "PACK") -> Any:
    from ray.train import (CheckpointConfig, DataConfig, FailureConfig, RunConfig,  # noqa: PLC0415 -- cluster path only
                           ScalingConfig)
    from ray.train.torch import TorchTrainer  # noqa: PLC0415 -- Ray only on the cluster path

    t = cfg.train
    resources = {"CPU": t.cpus_per_worker, **(worker_resources or {})}
    if t.gpus_per_worker:
        resources["GPU"] = t.gpus_per_worker
    # preserve_order: Ray Data hands each worker the same rows on every attempt (its splitter
    # then ignores locality and deals blocks in order), so resume skips exactly what was trained.
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    storage_path, storage_fs = run_storage(t.storage_path)
    # Elastic (train.min_workers): Ray Train V2 restarts the group with the workers that fit after a
    # loss (at least min_workers) and grows it back on a later resize check; every rank then reads
    # the whole epoch order and takes its slice of each global batch (PromptStream replicated).
    workers = (t.min_workers, t.num_workers) if t.elastic else t.num_workers
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=t.gpus_per_worker > 0,
                                     resources_per_worker=resources, placement_strategy=placement_strategy,
                                     accelerator_type=t.accelerator_type or None,
                                     elastic_resize_monitor_interval_s=t.resize_check_s),
        # Ray's default split drops up to n - 1 rows per epoch
        dataset_config=exact_split(ingest, replicate=t.elastic),
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
    ``pipelines.runtime.preflight`` runs first: a bad teacher, tracking server or CPU layout raises
    ``ConfigError`` before any Ray resources are requested. ``worker_resources`` (custom Ray
    resources added to each worker's, e.g. one ``{"trainer_slot": 1}`` per node) and
    ``placement_strategy`` (``PACK`` / ``SPREAD`` / ``STRICT_SPREAD``) place the workers on a cluster.
    """
    import ray  # noqa: PLC0415 -- Ray only on the cluster path

    root = results_root()
    cfg = absolute_paths(cfg, root)
    start_local = not ray.is_initialized() and resolve_ray_address(ray_address) == "local"
    preflight(cfg, local_cpus=local_cpus() if start_local else None)
    prompts_uri = resolve_prompts(cfg.data.prompts)
    num_prompts, sample_prompts = check_lake(cfg, prompts_uri)
    tracking_uri = cfg.tracking.uri or default_tracking_uri(root / "runs")
    checked = _Checked(root, prompts_uri, num_prompts, sample_prompts, tracking_uri,
                       _find_mlflow_run(tracking_uri, cfg.tracking.experiment, cfg.train.run_name,
                                        cfg.train.storage_path))
    with RunLease(cfg.train.storage_path, cfg.train.run_name):  # one job per run (pipelines.runtime.lease)
        return _run(cfg, checked, ray_address, worker_resources, placement_strategy)


@dataclass(frozen=True)
class _Checked:
    """What the driver found before Ray starts."""

    root: Any
    prompts_uri: str
    num_prompts: int | None
    sample_prompts: list[str]
    tracking_uri: str
    mlflow_run_id: str | None  # an MLflow run of this run name to resume, if any


def _run(cfg: DistillConfig, checked: _Checked, ray_address: str | None,
         worker_resources: dict[str, float] | None, placement_strategy: str) -> DistillResult:
    """:func:`run_distillation` once the run is checked and leased."""
    import ray  # noqa: PLC0415 -- Ray only on the cluster path

    root, prompts_uri, num_prompts = checked.root, checked.prompts_uri, checked.num_prompts
    sample_prompts, tracking_uri, existing = checked.sample_prompts, checked.tracking_uri, checked.mlflow_run_id
    num_epochs = cfg.epochs_needed(num_prompts) if num_prompts else cfg.data.epochs
    t = cfg.train
    steps = cfg.total_steps(num_prompts) if num_prompts else (cfg.data.max_steps or "?")
    say(f"[wadi] data: {redact(prompts_uri)} ({num_prompts if num_prompts is not None else 'uncounted'} prompts), "
        f"{num_epochs} epoch(s), {steps} steps of {t.global_batch} prompts")
    # Ray Train's controller reads it from the driver's environment (propagated to its actors): how
    # long a worker group may take to start before an elastic run tries the workers that fit.
    if t.elastic:
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", f"{t.worker_start_timeout_s:g}")
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
    if cfg.data.text_encoding == "actors":  # text-encoder actors feed the workers (pipelines/data/text_encoding.py)
        datasets = {name: encode_stage(ds, cfg) for name, ds in datasets.items()}
        text_conds = precompute_conds(cfg, ["", *sample_prompts])
    spec = cfg.vsd.student
    tags = {
        "wadi.run_name": cfg.train.run_name, "wadi.recipe": cfg.recipe, "git.sha": git_sha(),
        "wadi.teacher": cfg.teacher, "wadi.adapter": f"{spec.kind} r={spec.rank} (fake {cfg.vsd.fake.kind} "
                                                     f"r={cfg.vsd.fake.rank})",
        "wadi.prompts": prompts_uri, **ray_job_ids(),
    }
    flag = ray.remote(num_cpus=0)(StopFlag).remote()  # SIGINT / SIGTERM -> a clean stop (pipelines.runtime.stop)
    repair_ray_snapshot(cfg.train.storage_path, cfg.train.run_name)
    newest = latest_complete_checkpoint(cfg.train.storage_path, cfg.train.run_name)
    start_step = checkpoint_step(newest.path) if newest else 0  # where this job starts training
    with stop_on_signals(flag) as signals:
        with start_run(cfg.tracking.experiment, run_name=cfg.train.run_name, tracking_uri=tracking_uri,
                       params=None if existing else headline_params(cfg, num_prompts),
                       tags=tags, run_id=existing) as tracker:
            if not existing:
                _log_config(tracker, cfg)
            loop_config = {
                "config": cfg.to_flat(), "mlflow_run_id": tracker.run_id, "tracking_uri": tracking_uri,
                "export_uri": cfg.export_uri, "sample_prompts": sample_prompts, "num_epochs": num_epochs,
                "total_steps": cfg.total_steps(num_prompts) if num_prompts else None, "text_conds": text_conds,
                "stop_flag": flag,
            }
            workers = f"{t.min_workers}-{t.num_workers} (elastic)" if t.elastic else str(t.num_workers)
            say(f"[wadi] training: {workers} Ray Train workers, DeepSpeed ZeRO-{t.zero_stage}, checkpoints "
                f"every {t.checkpoint_every or 'end'} steps in {redact(storage.join(t.storage_path, t.run_name))}")
            try:
                result = call_in_thread(_trainer(cfg, loop_config, datasets, worker_resources,
                                                 placement_strategy).fit)
            except RunInterrupted as e:  # a second signal: no final checkpoint
                newest = latest_complete_checkpoint(cfg.train.storage_path, cfg.train.run_name)
                raise RunInterrupted(e.signum, checkpoint_step(newest.path) if newest else 0,
                                     newest.path if newest else None, forced=True) from None
            except Exception as e:  # Ray Train 2.x raises the run's error from fit()
                if signals.signum:
                    raise RunInterrupted(signals.signum, None, None, forced=True) from e
                raise RunFailed(redact(_failure_message(cfg, e))) from e
            signals.graceful = False  # from here on a signal aborts at once
            metrics = dict(result.metrics or {})
            step = int(metrics.get("step", 0))
            if signals.signum:
                newest = latest_complete_checkpoint(cfg.train.storage_path, cfg.train.run_name)
                raise RunInterrupted(signals.signum, step, newest.path if newest else None)
            if result.error is not None:
                raise RunFailed(redact(_failure_message(cfg, result.error)))
            if step == 0:
                raise RunFailed(f"distillation run {cfg.train.run_name} trained 0 steps: its workers found fewer "
                                f"good prompts than one global batch (train.global_batch={cfg.train.global_batch}; "
                                "see the data/bad_* metrics). Nothing was registered.")
            prune_untracked_checkpoints(cfg.train.storage_path, cfg.train.run_name,
                                        [c.path for c, _ in (result.best_checkpoints or [])])
            model = None
            trained = step > start_step
            if not trained:
                warnings.warn(f"run {cfg.train.run_name} was already complete at step {step}: nothing trained, so "
                              "nothing registered and no closing evaluation (give a new train.run_name, or raise "
                              "data.max_steps / data.epochs, to train more)")
            elif tracker.active:
                from pipelines.tracking.registry import \
                    log_and_register  # noqa: PLC0415 -- loads MLflow (slow), only to register

                local_export = storage.materialize(cfg.export_uri)
                # One copy in MLflow: the logged model (its "pipeline" artifact is the export); the run
                # points at it instead of holding the same files again as run artifacts.
                model = log_and_register(local_export, cfg.tracking.registered_model, cfg.tracking.alias,
                                         tracking_uri)
                if model:
                    tracker.set_tags({"wadi.registered_model": f"{model['name']}/{model['version']}",
                                      "wadi.export_model_uri": model["model_uri"]})
                    say(f"[wadi] export: {redact(cfg.export_uri)}, registered as models:/{model['name']}"
                        f"@{model['alias']} (version {model['version']})")
            elif cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"):
                warnings.warn("MLflow was unreachable: the export was not logged or registered")

        # After the training run is closed: the evaluation nests its own run under it, then adds final/*.
        if trained and cfg.evaluation.num_prompts:
            say(f"[wadi] evaluation: the one-step student vs the teacher on {cfg.evaluation.num_prompts} prompts")
        evaluation = final_evaluation(cfg, cfg.export_uri, tracker.run_id if tracker.active else None, root,
                                      tracking_uri=tracking_uri, step=step) if trained else None
        if evaluation and model:  # the quality travels with the registered model
            from pipelines.tracking.registry import \
                attach_quality  # noqa: PLC0415 -- loads MLflow (slow), only to register

            attach_quality(model, evaluation["metrics"], tracker.run_id, tracking_uri, evaluation["table"])
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    return DistillResult(run_name=cfg.train.run_name, tracking_uri=tracking_uri, mlflow_run_id=tracker.run_id,
                         mlflow_experiment_id=tracker.run.info.experiment_id if tracker.active else None,
                         export_uri=cfg.export_uri, checkpoint=checkpoint, metrics=metrics,
                         model=model, evaluation=evaluation)


def _log_config(tracker: Any, cfg: DistillConfig) -> None:
    """The resolved config (URI user info redacted) as the run's ``config.yaml``."""
    with tempfile.TemporaryDirectory(prefix="wadi-config-") as tmp:
        path = os.path.join(tmp, "config.yaml")
        with open(path, "w") as f:
            f.write(format_config(cfg) + "\n")
        tracker.log_artifact(path)


def _failure_message(cfg: DistillConfig, error: BaseException) -> str:
    """What the driver says when the fit failed; a full storage says so, where, and how to go on."""
    if not is_storage_full(error):
        return f"distillation run {cfg.train.run_name} failed: {error}"
    newest = latest_complete_checkpoint(cfg.train.storage_path, cfg.train.run_name)
    where = f"the newest complete checkpoint is {newest.path}" if newest else "no checkpoint was completed yet"
    lines = str(error).splitlines()
    detail = next((line.strip() for line in lines if "StorageFull:" in line),
                  next((line.strip() for line in lines if "No space left" in line), type(error).__name__))
    return (f"distillation run {cfg.train.run_name} stopped: storage is full under train.storage_path="
            f"{cfg.train.storage_path} (No space left on device). {where[0].upper() + where[1:]}. Free space there "
            f"and rerun the same command: it resumes from that checkpoint. ({detail[:500]})")
