"""End to end on a local Ray cluster (2 workers): S3 shards (moto) -> Ray Data -> Ray Train +
DeepSpeed ZeRO-2 -> checkpoints on S3 -> MLflow (sqlite) -> registered one-step export.

Two fits share one run name, so the second resumes the first:
  fit 1: rank 1 gets NaN text embeddings at step 2 (skipped on both ranks, counted), then kills
         itself before step 5 (checkpoint at 3) -> FailureConfig restarts the group, which
         resumes from step 3 and stops at max_steps=8 (export v1);
  fit 2: same run name, no max_steps, the newest checkpoint (8) truncated in S3 -> falls back to
         the previous complete one (6) and finishes the epoch (export v2).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

N_GOOD = 98  # + 1 empty caption + 1 corrupt shard = 100 rows: splits evenly over 2 workers
CHECKPOINT_EVERY, FAIL_AT, FIRST_STOP, KEEP = 3, 5, 8, 2
NAN_AT, FALLBACK = 2, 6  # a NaN batch on rank 1; the checkpoint before FIRST_STOP's


def _lake(tmp_path: Path, uri: str) -> None:
    from wadi_core import storage
    from wadi_core.prompts import write_prompt_shards

    colours, shapes = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle")
    samples = [(f"{i:09d}", f"a {colours[i % 4]} {shapes[i % 3]} on the left", {}) for i in range(N_GOOD + 1)]
    samples[17] = (samples[17][0], "", {})  # an empty caption
    local = tmp_path / "lake"
    write_prompt_shards(samples, str(local), shard_size=25)
    (local / "prompts-broken.tar").write_bytes(b"definitely not a tar" * 100)  # a corrupt shard
    storage.upload_dir(local, uri)


def _history_steps(client, run_id: str, key: str) -> Counter:  # noqa: ANN001
    return Counter(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1800)  # the heaviest test: two fits, a worker-group restart, exports (minutes on 2 cores)
def test_distill_end_to_end_with_failure_and_resume(tmp_path: Path, s3_bucket: str, ray_local) -> None:  # noqa: ANN001
    import mlflow
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    from wadi_core import storage
    from wadi_core.models.tiny import save_tiny_pipeline

    from pipelines.config.job import load_config
    from pipelines.run import run_distillation

    teacher = save_tiny_pipeline(tmp_path / "teacher", "sd")
    _lake(tmp_path, f"s3://{s3_bucket}/lake")
    marker = tmp_path / "killed-once"
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = {
        "teacher": str(teacher),
        "vsd.student.rank": 4, "vsd.fake.rank": 2,
        "data.prompts": f"s3://{s3_bucket}/lake", "data.epochs": 1, "data.max_steps": FIRST_STOP,
        "train.run_name": "e2e", "train.global_batch": 8, "train.num_workers": 2, "train.cpus_per_worker": 0.5,
        "train.zero_stage": 2, "train.checkpoint_every": CHECKPOINT_EVERY, "train.keep": KEEP,
        "train.storage_path": f"s3://{s3_bucket}/ray", "train.max_failures": 1,
        "tracking.uri": tracking_uri, "tracking.experiment": "e2e", "tracking.registered_model": "wadi-e2e",
        "tracking.alias": "candidate", "tracking.sample_every": 4, "tracking.num_sample_prompts": 4,
        "debug.fail_rank": 1, "debug.fail_at_step": FAIL_AT, "debug.fail_marker": str(marker),
        "debug.nan_rank": 1, "debug.nan_at_step": NAN_AT,
        "vsd.student_ema": 0.9, "evaluation.num_prompts": 0,  # the closing evaluation: tests/test_final_eval.py
    }

    # Fit 1: a worker dies before step 5; the group restarts from the checkpoint at step 3.
    cfg = load_config("embedded", overrides)
    first = run_distillation(cfg)
    assert marker.exists(), "the fault injection did not fire"
    assert first.metrics["step"] == FIRST_STOP and first.metrics["resumed_from_step"] == CHECKPOINT_EVERY

    # Fit 2: same run name, no step limit, the newest checkpoint damaged in storage (a truncated
    # upload) -> falls back to the previous complete one (6) and finishes the epoch.
    import boto3

    s3 = boto3.client("s3")
    key = f"ray/e2e/checkpoint_{FIRST_STOP:08d}/student/state/zero_pp_rank_1_mp_rank_00_optim_states.pt"  # rank 1's
    body = s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=s3_bucket, Key=key, Body=body[: len(body) // 2])
    second = run_distillation(load_config("embedded", {**overrides, "data.max_steps": 0}))
    last = second.metrics["step"]
    assert second.mlflow_run_id == first.mlflow_run_id  # one MLflow run per run name
    assert second.metrics["resumed_from_step"] == FALLBACK
    assert second.metrics["resume/corrupt_checkpoints_skipped"] == 1
    assert second.metrics["distill/nonfinite_steps"] == 1  # the NaN step of fit 1, carried in the checkpoints
    assert N_GOOD // 8 - 1 <= last <= N_GOOD // 8  # one epoch of 98 good prompts at 8 per step
    # The corrupt shard and the empty caption were skipped and counted exactly once.
    assert second.metrics["data/bad_corrupt_shard"] == 1 and second.metrics["data/bad_empty_caption"] == 1

    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(first.mlflow_run_id)
    assert run.data.params["train.zero_stage"] == "2" and run.data.params["adapters"] == "lorad r=4 / fake lorad r=2"
    assert run.data.params["data.prompts"] == f"s3://{s3_bucket}/lake"
    assert "vsd.guidance_real" not in run.data.params and len(run.data.params) <= 20, \
        f"a few headline params; the whole config is config.yaml: {sorted(run.data.params)}"
    import yaml

    config = yaml.safe_load(Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="config.yaml", tracking_uri=tracking_uri)).read_text())
    assert config["vsd"]["guidance_real"] == cfg.vsd.guidance_real and config["train"]["run_name"] == "e2e"
    assert run.data.tags["wadi.teacher"] == str(teacher) and run.data.tags["ray.job_id"]
    assert run.data.tags["wadi.adapter"].startswith("lorad r=4")
    # Steps before a checkpoint are never redone: 1..3 once, 4 twice (after the kill), 7..8 twice
    # (after the fallback), the rest once.
    steps = _history_steps(client, run.info.run_id, "distill/loss_fake")
    assert steps == Counter({**{s: 1 for s in range(1, last + 1)}, FAIL_AT - 1: 2, 7: 2, 8: 2})
    assert sorted(m.value for m in client.get_metric_history(run.info.run_id, "resume/from_step")) == [
        CHECKPOINT_EVERY, FALLBACK]
    assert run.data.metrics["resume/corrupt_checkpoints_skipped"] == 1
    nonfinite = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "distill/nonfinite_steps")}
    assert nonfinite[NAN_AT - 1] == 0 and nonfinite[NAN_AT] == 1 and nonfinite[last] == 1
    for key in ("distill/grad_norm_student", "distill/grad_norm_fake", "perf/prompts_per_second"):
        assert np.isfinite(run.data.metrics[key])
    assert run.data.metrics["data/bad_corrupt_shard"] == 1 and run.data.metrics["data/bad_empty_caption"] == 1

    # Sample grids are step-aware images (key "samples"); the export is logged once, as the model.
    samples = {int(m.group(1)) for a in client.list_artifacts(run.info.run_id, "images")
               if (m := re.search(r"/samples[+%]step[+%](\d+)[+%]", a.path))}
    assert {0, 4, last} <= samples, samples  # from the student at init on
    prompts_file = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                            artifact_path="images/sample_prompts.txt",
                                                            tracking_uri=client.tracking_uri))
    assert prompts_file.read_text().splitlines()[0].startswith("0: a ")  # tile 0's prompt
    assert not client.list_artifacts(run.info.run_id, "export"), "the export is logged twice"
    model_uri = run.data.tags["wadi.export_model_uri"]
    model_files = {p.name for p in Path(mlflow.artifacts.download_artifacts(
        model_uri, tracking_uri=client.tracking_uri)).rglob("*")}
    assert {"model_index.json", "student.safetensors"} <= model_files

    # Checkpoints live on S3; num_to_keep kept the newest KEEP of them.
    names = {f.split("/ray/e2e/", 1)[1].split("/")[0] for f in storage.list_files(f"s3://{s3_bucket}/ray/e2e")}
    ckpts = sorted(n for n in names if re.fullmatch(r"checkpoint_\d+", n))
    assert len(ckpts) == KEEP and ckpts[-1] == f"checkpoint_{last:08d}"
    # ... each with the student adapter as plain safetensors (what evaluate.py schedule reads).
    from wadi_core.adapters import load_adapter_file

    adapter_file = storage.materialize(f"s3://{s3_bucket}/ray/e2e/{ckpts[-1]}/adapters/student.safetensors",
                                       cache_dir=tmp_path / "ckpt-cache")
    adapter_state, adapter_spec = load_adapter_file(adapter_file)
    # The student EMA is checkpointed beside it (and restored on resume: it saw every step once).
    ema_file = storage.materialize(f"s3://{s3_bucket}/ray/e2e/{ckpts[-1]}/student_ema.safetensors",
                                   cache_dir=tmp_path / "ckpt-cache")
    from safetensors.torch import load_file

    assert int(load_file(str(ema_file))["updates"]) == last - 1  # every step but the skipped NaN one
    assert adapter_spec.kind == "lorad" and adapter_state
    assert all(torch.isfinite(v).all() for v in adapter_state.values())  # the NaN batch left no trace
    assert any(v.abs().sum() > 0 for k, v in adapter_state.items() if k.endswith(".A"))  # trained, not init

    # The registered model (alias -> the second run's version) and the export sample in ONE step.
    version = client.get_model_version_by_alias("wadi-e2e", "candidate")
    assert int(version.version) == 2 and second.model and int(second.model["version"]) == 2
    local = mlflow.artifacts.download_artifacts(model_uri, tracking_uri=tracking_uri)
    pipe = DiffusionPipeline.from_pretrained(next(Path(local).rglob("model_index.json")).parent)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(1)
    assert pipe.scheduler.timesteps.tolist() == [999]
    images = pipe(["a red circle on the left"], num_inference_steps=1, guidance_scale=1.0, output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    # ... and through the registry: the pyfunc model behind the alias samples in one step too.
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model("models:/wadi-e2e@candidate")
    out = model.predict(["a blue square on the left", "a red circle on the left"])
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8


def test_checkpoint_discovery_and_pruning(tmp_path: Path) -> None:
    """Resume looks for the newest *complete* checkpoint in storage; pruning spares tracked ones."""
    pytest.importorskip("ray")
    from pipelines.train.checkpoint import (checkpoint_step, latest_complete_checkpoint, mark_complete,
                                      prune_untracked_checkpoints)

    run = tmp_path / "run"
    for step in (3, 6, 9):
        (run / f"checkpoint_{step:08d}").mkdir(parents=True)
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    assert latest_complete_checkpoint(str(tmp_path), "run") is None  # nothing marked complete
    for step in (3, 6):
        mark_complete(str(tmp_path), "run", f"checkpoint_{step:08d}")
    found = latest_complete_checkpoint(str(tmp_path), "run")
    assert found is not None and checkpoint_step(found.path) == 6  # 9 is incomplete (a rank died)
    assert latest_complete_checkpoint(str(tmp_path), "missing-run") is None

    removed = prune_untracked_checkpoints(str(tmp_path), "run", [str(run / "checkpoint_00000006"),
                                                                 str(run / "checkpoint_00000009")])
    assert removed == ["checkpoint_00000003"]
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint_00000006", "checkpoint_00000009", "checkpoint_manager_snapshot.json"]


def test_relative_paths_become_absolute(tmp_path: Path) -> None:
    from pipelines.config.job import absolute_paths, load_config

    cfg = absolute_paths(load_config("embedded", {"data.prompts": "lake", "export_dir": "out/export"}), tmp_path)
    assert cfg.train.storage_path == str(tmp_path / "runs" / "ray")
    assert cfg.data.prompts == str(tmp_path / "lake") and cfg.export_dir == str(tmp_path / "out" / "export")
    assert cfg.teacher == "embedded"
    s3 = absolute_paths(load_config("sd15"), tmp_path)
    assert s3.train.storage_path.startswith("s3://") and s3.teacher == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_deepspeed_updater_and_checkpoint_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One-process gloo world: the Updater protocol on a DeepSpeed ZeRO-2 engine, and the
    training-state checkpoint (engine, progress, RNG) round trip."""
    import socket

    import torch
    import torch.distributed as dist

    pytest.importorskip("deepspeed")
    from wadi_core.vsd import Updater, VSDConfig

    from pipelines.train.checkpoint import (IncompatibleCheckpoint, TrainState, load_training_state, model_fingerprint,
                                      read_train_state, save_training_state)
    from pipelines.config.job import TrainConfig
    from pipelines.train.engines import DeepSpeedUpdater, build_engine, init_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        init_distributed()
        torch.manual_seed(0)
        module = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
        engine = build_engine(module, 1e-2, TrainConfig(global_batch=2, num_workers=1, zero_stage=2),
                              VSDConfig(grad_clip=0.5))
        updater = DeepSpeedUpdater(engine)
        assert isinstance(updater, Updater)
        before = module[0].weight.detach().clone()
        updater.backward((module[0](torch.randn(2, 4)) * 100).pow(2).mean())
        result = updater.step()
        assert result.stepped and result.grad_norm > 50  # the pre-clip norm ...
        # ... clipped to 0.5 for the step: AdamW's first moment is now 0.1 x the gradient it stepped
        # with (its update, ~lr * sign(grad), would look the same unclipped). ZeRO-2: the engine's
        # optimizer wraps a torch AdamW over its flat fp32 partitions (all of them in a world of 1).
        adam = engine.optimizer.optimizer
        assert isinstance(adam, torch.optim.AdamW) and adam.state
        moment = sum(float(s["exp_avg"].double().pow(2).sum()) for s in adam.state.values()) ** 0.5
        assert moment == pytest.approx(0.1 * 0.5, rel=1e-4)
        assert not torch.equal(before, module[0].weight)

        saved_weight = module[0].weight.detach().clone()
        teacher = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.Linear(8, 8))
        fp = model_fingerprint("embedded", teacher, {"student": module})
        save_training_state(tmp_path / "ckpt", {"student": engine},
                            TrainState(step=5, epoch=1, data_position=2, fingerprint=fp,
                                       meta={"bad_before_epoch": {"empty_caption": 1}},
                                       optimizers={"ignored": {"w": torch.ones(1)}}), 0)
        # Scalars only: the engines hold the tensors.
        assert not (tmp_path / "ckpt" / "train_state.safetensors").exists()
        with torch.no_grad():
            module[0].weight.add_(1.0)
        # A retrained teacher (same shapes, other weights) or other adapter shapes: refused, nothing loaded.
        retrained = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.Linear(8, 8))
        for other in (model_fingerprint("embedded", retrained, {"student": module}),
                      model_fingerprint("embedded", teacher, {"student": torch.nn.ModuleList([torch.nn.Linear(4, 2)])})):
            with pytest.raises(IncompatibleCheckpoint, match="new train.run_name"):
                load_training_state(tmp_path / "ckpt", {"student": engine}, 0, other)
        assert not torch.equal(module[0].weight, saved_weight)
        state = load_training_state(tmp_path / "ckpt", {"student": engine}, 0, fp)
        assert state.fingerprint == fp
        assert (state.step, state.epoch, state.data_position) == (5, 1, 2)
        assert state.meta == {"bad_before_epoch": {"empty_caption": 1}} and not state.optimizers
        # A checkpoint written before train_state.json (its progress.json) still resumes.
        (tmp_path / "ckpt" / "train_state.json").unlink()
        (tmp_path / "ckpt" / "progress.json").write_text(json.dumps(
            {"step": 5, "epoch": 1, "batches_in_epoch": 2, "prompts_seen": 40, "mlflow_run_id": "abc",
             "bad_before_epoch": {"empty_caption": 1}, "fingerprint": fp, "nonfinite_steps": 1}))
        legacy = read_train_state(tmp_path / "ckpt")
        assert (legacy.step, legacy.epoch, legacy.data_position, legacy.prompts_seen, legacy.nonfinite_steps,
                legacy.mlflow_run_id) == (5, 1, 2, 40, 1, "abc")
        assert legacy.meta == {"bad_before_epoch": {"empty_caption": 1}} and legacy.fingerprint == fp
        assert torch.equal(module[0].weight, saved_weight)
        with pytest.raises(RuntimeError, match="no DeepSpeed state for 'fake'"):
            load_training_state(tmp_path / "ckpt", {"fake": engine}, 0)
    finally:
        from conftest import reset_process_group

        reset_process_group()
