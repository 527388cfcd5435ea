"""One evaluation run (generate + metrics as one Ray job, logged to MLflow) and the scheduled mode.

A run's outputs: ``<out>/metrics.json``, ``<out>/grid.png``, ``<out>/fake_stats.safetensors``,
``<out>/prompts.jsonl`` (key, prompt, seed) and, with ``save_images="files"``, the PNGs in
``<out>/images/<group>/{idx:05d}.png``. In MLflow: params (flattened config, prompt-list sha256,
reference manifest), metrics, the grid, tags ``wadi.train_run_id`` / ``wadi.checkpoint_id``; when
a training run is given the eval run is nested under it and the headline metrics are also written
to the training run at the checkpoint's step (``eval/fid`` etc.).
"""

from __future__ import annotations

import json
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from wadi_core import storage
from wadi_core.config import to_flat_dict

from pipelines.evaluate.config import EvaluationRun, EvaluationTracking, RayResources
from pipelines.evaluate.generation import generation_dataset, load_prompts, prompt_seed, write_png_files
from pipelines.evaluate.metrics import (Reference, build_reference, compute_metrics, env_for_workers,
                                        extractor_weights_sha256, features_and_stats, sample_grid)
from pipelines.runtime.cluster import check_accelerator_available, init_ray
from pipelines.tracking.client import default_tracking_uri, git_sha, start_run
from pipelines.train.checkpoint import STATE_FILES, checkpoint_step

__all__ = ["run_evaluation", "ensure_reference", "init_evaluation_ray",
           "check_actor_accelerator",
           "Checkpoint", "list_checkpoints", "evaluated_checkpoint_ids", "run_schedule"]


def init_evaluation_ray(num_cpus: int | None = None) -> None:
    """``pipelines.runtime.cluster.init_ray`` for evaluation actors: connect to ``RAY_ADDRESS`` if
    set, else start a local Ray without dashboard; the actors get the S3 / MLflow env."""
    init_ray(num_cpus=num_cpus, runtime_env={"env_vars": env_for_workers()}, include_dashboard=False)


def check_actor_accelerator(r: RayResources) -> None:
    """The actors' accelerator type exists on the joined cluster (a warning: it may autoscale)."""
    if not r.accelerator_type:
        return
    import ray  # noqa: PLC0415 -- Ray only on the cluster path

    check_accelerator_available(r.accelerator_type, ray.cluster_resources(), "ray.accelerator_type", strict=False)


def ensure_reference(cfg: EvaluationRun) -> Reference | None:
    """Load the stored reference; build and store it once if it is missing and a source is given."""
    if cfg.metrics.extractor == "none":
        return None
    if cfg.reference and Reference.exists(cfg.reference):
        ref = Reference.load(cfg.reference)
        want = cfg.metrics.extractor
        if ref.manifest.get("extractor") != want:
            raise ValueError(f"reference {cfg.reference} was computed with extractor "
                             f"{ref.manifest.get('extractor')!r}, not {want!r}: pass a matching --reference")
        sha = extractor_weights_sha256(cfg.metrics)
        if sha and ref.manifest.get("extractor_weights_sha256") not in (None, sha):
            raise ValueError(f"reference {cfg.reference} was computed with other {want} weights (sha256 "
                             f"{ref.manifest.get('extractor_weights_sha256')}, now {sha}): delete it to rebuild it "
                             "from --reference-images, or pass another --reference")
        return ref
    if not cfg.reference_images:
        return None
    r = cfg.ray
    ref = build_reference(cfg.reference_images, cfg.metrics, concurrency=r.metric_workers,
                          batch_size=max(r.batch_size, 64), cpus_per_actor=r.cpus_per_actor,
                          gpus_per_actor=r.metric_gpus, accelerator_type=r.accelerator_for(r.metric_gpus))
    if cfg.reference:
        ref.save(cfg.reference)
    return ref


def run_evaluation(cfg: EvaluationRun) -> dict[str, Any]:
    """Generate images for the prompts, compute metrics, write outputs, log to MLflow."""
    init_evaluation_ray()
    r = cfg.ray
    check_actor_accelerator(r)
    records, prompt_info = load_prompts(cfg.prompts, cfg.num_prompts, cfg.draw_seed)
    reference = ensure_reference(cfg)
    ds = generation_dataset(records, cfg.model, cfg.seed, concurrency=r.gen_workers, batch_size=r.batch_size,
                            cpus_per_actor=r.cpus_per_actor, gpus_per_actor=r.gpus_per_actor,
                            accelerator_type=r.accelerator_for(r.gpus_per_actor))
    if cfg.save_images == "files":
        ds = ds.map_batches(write_png_files, fn_kwargs={"root": storage.join(cfg.out, "images")},
                            batch_format="numpy", num_cpus=0.25)
    grid_keys = tuple(rec.key for rec in records[: cfg.grid])
    t0 = time.time()
    rows, stats = features_and_stats(ds, cfg.metrics, concurrency=r.metric_workers, batch_size=r.batch_size,
                                     cpus_per_actor=r.cpus_per_actor, gpus_per_actor=r.metric_gpus,
                                     accelerator_type=r.accelerator_for(r.metric_gpus), grid_keys=grid_keys)
    seconds = time.time() - t0
    metrics = compute_metrics(rows, stats, reference, cfg.metrics)
    metrics["eval_seconds"] = seconds  # generation + metrics, actor start-up included
    _write_outputs(cfg, rows, stats, metrics, prompt_info, reference)
    _log_mlflow(cfg, metrics, prompt_info, reference, records)
    return {"metrics": metrics, "out": cfg.out, "prompts": prompt_info}


def _write_outputs(cfg: EvaluationRun, rows: list[dict[str, Any]], stats: Any, metrics: dict[str, float],
                   prompt_info: dict[str, Any], reference: Reference | None) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="wadi-eval-out-"))
    grid = sample_grid([r for r in rows if len(r.get("png", b""))])
    if grid is not None:
        grid.save(tmp / "grid.png")
    if stats is not None:
        stats.metadata.update({"extractor": cfg.metrics.extractor, "prompts_sha256": prompt_info["sha256"]})
        stats.save(tmp / "fake_stats.safetensors")
    (tmp / "prompts.jsonl").write_text("".join(
        json.dumps({"key": str(r["key"]), "group": str(r["group"]), "idx": int(r["idx"]),
                    "prompt": str(r["prompt"]), "seed": prompt_seed(cfg.seed, str(r["key"]))}) + "\n" for r in rows))
    summary = {"metrics": metrics, "prompts": prompt_info, "config": to_flat_dict(cfg),
               "reference": reference.manifest if reference else None}
    (tmp / "metrics.json").write_text(json.dumps(summary, indent=2, default=str))
    storage.upload_dir(tmp, cfg.out)


def prompt_dataset(records: list[Any], prompt_info: dict[str, Any], seed: int) -> Any:
    """The prompt list as an MLflow dataset: one row per prompt (key, group, prompt, seed), named
    and digested by the list's sha256, so runs on the same prompts share one dataset."""
    import mlflow.data  # noqa: PLC0415 -- MLflow is optional and slow to import
    import pandas as pd  # noqa: PLC0415 -- pandas only for MLflow's run tables

    sha = str(prompt_info["sha256"])
    df = pd.DataFrame({"key": [str(r.key) for r in records], "group": [str(r.group) for r in records],
                       "prompt": [str(r.prompt) for r in records],
                       "seed": [prompt_seed(seed, str(r.key)) for r in records]})
    # MLflow stores at most 36 characters of digest; the name carries the whole hash.
    return mlflow.data.from_pandas(df, name=f"prompts-{sha}", digest=sha[:32])


def logged_model_id(model_uri: str, tracking_uri: str | None) -> str | None:
    """The MLflow 3 LoggedModel id behind ``models:/<name>@<alias>``, ``models:/<name>/<version>``
    or ``models:/<model_id>``; None for anything else (a folder, a checkpoint's adapter file)."""
    if not model_uri.startswith("models:/"):
        return None
    try:
        import mlflow  # noqa: PLC0415 -- MLflow is optional and slow to import

        mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
        return mlflow.models.get_model_info(model_uri).model_id
    except Exception as e:  # tracking never takes the job down
        warnings.warn(f"cannot resolve the logged model of {model_uri} ({type(e).__name__}: {e}); "
                      "its metrics are not linked to it")
        return None


def _log_mlflow(cfg: EvaluationRun, metrics: dict[str, float], prompt_info: dict[str, Any],
                reference: Reference | None, records: list[Any] | None = None) -> None:
    t = cfg.tracking
    experiment, tags = t.experiment, {"wadi.kind": "evaluation", "wadi.model_uri": cfg.model.uri,
                                      "wadi.git_sha": git_sha()}
    if t.train_run_id:
        tags.update({"wadi.train_run_id": t.train_run_id, "mlflow.parentRunId": t.train_run_id})
        experiment = _experiment_of_run(t.train_run_id, t.tracking_uri) or experiment
    if t.checkpoint_id:
        tags.update({"wadi.checkpoint_id": t.checkpoint_id, "wadi.checkpoint_source": t.checkpoint_source or ""})
    # The metrics section as it applies (no unused CLIP / HPS model names) and what "fid" was computed on.
    params = {**{k: v for k, v in to_flat_dict(cfg).items() if not k.startswith("metrics.")},
              **cfg.metrics.describe(),
              "prompts.sha256": prompt_info["sha256"], "prompts.num": prompt_info["num_prompts"]}
    if reference is not None:
        params.update({f"reference.{k}": v for k, v in reference.manifest.items()})
    model_name = Path(cfg.model.uri.rstrip("/")).name or cfg.model.uri
    # Model, steps, guidance, prompt set and when: two evaluations of one model get two names.
    name = t.run_name or t.checkpoint_id or (
        f"{model_name}-{cfg.model.steps}step-cfg{cfg.model.guidance:g}-{prompt_info.get('source', cfg.prompts)}"
        f"-{time.strftime('%Y%m%d-%H%M%S')}")
    model_id = logged_model_id(cfg.model.uri, t.tracking_uri)
    if model_id:
        tags["wadi.model_id"] = model_id
    with start_run(experiment, run_name=name, tracking_uri=resolve_tracking_uri(t.tracking_uri),
                            params=params, tags=tags,
                            started_at=time.time() - float(metrics.get("eval_seconds", 0.0))) as run:
        dataset = None
        if run.active and records:
            try:
                dataset = prompt_dataset(records, prompt_info, cfg.seed)
            except Exception as e:  # noqa: BLE001 - the metrics matter more than the link
                warnings.warn(f"prompt dataset not logged ({type(e).__name__}: {e})")
        if dataset is not None:
            run.log_input(dataset, context="evaluation", model_id=model_id,
                          tags={"prompts.source": prompt_info.get("source", cfg.prompts)})
        # Metrics tied to the evaluated LoggedModel (its page lists them) and to the prompt set.
        run.log_metrics(metrics, model_id=model_id, dataset=dataset)
        for f in ("grid.png", "metrics.json"):
            local = _local_copy(storage.join(cfg.out, f))
            if local is not None:
                run.log_artifact(local, artifact_path="eval")
    if t.train_run_id and t.metrics_on_train_run:
        _log_on_train_run(t, metrics)


def _local_copy(uri: str) -> Path | None:
    try:
        data = storage.read_bytes(uri)
    except (FileNotFoundError, OSError):
        return None
    path = Path(tempfile.mkdtemp(prefix="wadi-art-")) / uri.rsplit("/", 1)[-1]
    path.write_bytes(data)
    return path


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """The given URI, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/runs/mlflow.db`` (jobs/distill.py's)."""
    return tracking_uri or default_tracking_uri(Path.cwd() / "runs")


def _client(tracking_uri: str | None) -> Any:
    import mlflow  # noqa: PLC0415 -- MLflow is optional and slow to import

    return mlflow.MlflowClient(resolve_tracking_uri(tracking_uri))


def _experiment_of_run(run_id: str, tracking_uri: str | None) -> str | None:
    try:
        client = _client(tracking_uri)
        return client.get_experiment(client.get_run(run_id).info.experiment_id).name
    except Exception as e:  # tracking never takes the job down
        warnings.warn(f"cannot read training run {run_id} ({type(e).__name__}: {e}); logging to the eval experiment")
        return None


def _log_on_train_run(t: EvaluationTracking, metrics: dict[str, float]) -> None:
    """Headline metrics on the training run itself, at the checkpoint step (status untouched)."""
    try:
        client = _client(t.tracking_uri)
        step = int(t.checkpoint_step or 0)
        for k, v in metrics.items():
            if "/" not in k and k not in ("num_images", "eval_seconds"):
                client.log_metric(t.train_run_id, f"eval/{k}", float(v), step=step)
    except Exception as e:
        warnings.warn(f"could not log eval metrics on training run {t.train_run_id}: {type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class Checkpoint:
    """An evaluable checkpoint: a pipeline dir, or an adapter file on top of the teacher."""

    id: str
    source: str
    step: int
    pipeline: str | None = None
    adapter: str | None = None


_NUMBER = re.compile(r"(\d+)")


def _step_of(name: str, fallback: int) -> int:
    """The trainer's ``checkpoint_<step>`` (``pipelines.train.checkpoint.checkpoint_step``); a folder
    named by another trainer: its last number, else ``fallback`` (its place in the listing)."""
    step = checkpoint_step(name)
    if step >= 0:
        return step
    nums = _NUMBER.findall(name)
    return int(nums[-1]) if nums else fallback


def _mlflow_files(source: str, tracking_uri: str | None) -> list[str]:
    """All artifact files under ``runs:/<run_id>/<path>``, as ``runs:/`` URIs."""
    run_id, _, path = source[len("runs:/"):].partition("/")
    client = _client(tracking_uri)
    out, stack = [], [path.rstrip("/")]
    while stack:
        for info in client.list_artifacts(run_id, stack.pop() or None):
            if info.is_dir:
                stack.append(info.path)
            else:
                out.append(f"runs:/{run_id}/{info.path}")
    return sorted(out)


def list_checkpoints(source: str, tracking_uri: str | None = None) -> list[Checkpoint]:
    """Checkpoint directories directly under ``source`` (local, ``s3://`` or MLflow ``runs:/<id>/<path>``),
    oldest first.

    A directory counts if it holds a diffusers pipeline (``model_index.json``, the export) or a
    WaDi adapter file named ``*student*.safetensors``; anything else (still being written, or
    training state only) is skipped.
    """
    if source.startswith("runs:/"):
        files, root = _mlflow_files(source, tracking_uri), source.rstrip("/")
    else:
        files = storage.list_files(source)
        root = storage.filesystem(source)[1] if not storage.is_remote(source) else source.rstrip("/")
    by_dir: dict[str, list[str]] = {}
    for f in files:
        rel = f[len(root):].lstrip("/")
        if "/" in rel:
            by_dir.setdefault(rel.split("/", 1)[0], []).append(rel.split("/", 1)[1])
    out = []
    for i, name in enumerate(sorted(by_dir)):
        inner = by_dir[name]
        base = storage.join(source, name)
        index = sorted((p for p in inner if p.endswith("model_index.json")), key=lambda p: p.count("/"))
        adapters = sorted(p for p in inner if "student" in p.rsplit("/", 1)[-1] and p.endswith(".safetensors"))
        if index:
            sub = index[0].rsplit("/", 1)[0] if "/" in index[0] else ""
            out.append(Checkpoint(name, source, _step_of(name, i), pipeline=storage.join(base, sub) if sub else base))
        elif adapters:
            out.append(Checkpoint(name, source, _step_of(name, i), adapter=storage.join(base, adapters[0])))
    return sorted(out, key=lambda c: (c.step, c.id))


def evaluated_checkpoint_ids(cfg: EvaluationRun, source: str) -> set[str]:
    """Checkpoint ids already evaluated (or being evaluated) for ``source``, from MLflow and ``out``."""
    done: set[str] = set()
    try:
        import mlflow  # noqa: PLC0415 -- MLflow is optional and slow to import

        client = _client(cfg.tracking.tracking_uri)
        exps = [e.experiment_id for e in client.search_experiments()]
        runs = mlflow.search_runs(
            experiment_ids=exps, output_format="list",
            filter_string=f"tags.`wadi.checkpoint_source` = '{source}' and attributes.status != 'FAILED'")
        done |= {r.data.tags.get("wadi.checkpoint_id") for r in runs}
    except Exception as e:
        warnings.warn(f"MLflow not readable ({type(e).__name__}: {e}); using the outputs folder only")
    fs, path = storage.filesystem(cfg.out)
    if fs.exists(path):
        for f in storage.list_files(cfg.out, "metrics.json"):
            done.add(f.rstrip("/").rsplit("/", 2)[-2])
    return {d for d in done if d}


def checkpoint_train_run_id(source: str, checkpoint_id: str) -> str | None:
    """The MLflow run that wrote a checkpoint, from its own record (the ``mlflow_run_id`` of its
    ``train_state.json``, or ``progress.json`` in older ones: pipelines.train.checkpoint); None when the
    checkpoint has no such record."""
    if source.startswith(("runs:/", "models:/")):
        return None
    for name in STATE_FILES:
        try:
            record = json.loads(storage.read_bytes(storage.join(source, checkpoint_id, name)))
        except (FileNotFoundError, OSError, ValueError):
            continue
        return record.get("mlflow_run_id") or None
    return None


def run_schedule(cfg: EvaluationRun, source: str, teacher: str, limit: int | None = None) -> list[str]:
    """Evaluate every checkpoint under ``source`` not evaluated yet; returns the ids evaluated now.

    Idempotent, so a cron can call it: evaluated checkpoints are found by their MLflow tags
    (``wadi.checkpoint_source`` + ``wadi.checkpoint_id``) or their ``<out>/<id>/metrics.json``.
    """
    done = evaluated_checkpoint_ids(cfg, source)
    todo = [c for c in list_checkpoints(source, cfg.tracking.tracking_uri) if c.id not in done][:limit]
    evaluated = []
    for ckpt in todo:
        model = replace(cfg.model, uri=ckpt.pipeline or teacher, adapter=ckpt.adapter)
        train_run = cfg.tracking.train_run_id or checkpoint_train_run_id(source, ckpt.id)
        tracking_spec = replace(cfg.tracking, checkpoint_id=ckpt.id, checkpoint_source=source,
                                checkpoint_step=ckpt.step, train_run_id=train_run)
        run_evaluation(replace(cfg, model=model, tracking=tracking_spec, out=storage.join(cfg.out, ckpt.id)))
        evaluated.append(ckpt.id)
    return evaluated


