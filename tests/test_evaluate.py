"""Evaluation job: metric actor, exact merge of partial statistics, references, MLflow, schedule."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipelines.evaluate.config import EvaluationRun, EvaluationTracking, MetricsSpec, ModelSpec, RayResources
from pipelines.evaluate.runs import list_checkpoints, run_schedule
from pipelines.evaluate.metrics import (MetricActor, Reference, compute_metrics, merge_partials,
                                  partial_stats)
from wadi_core.metrics import GaussianStats, frechet_distance

SPEC = MetricsSpec(extractor="thumbnail:2", scorers=("mean_intensity",))


def _batch(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return {"idx": np.arange(n), "key": np.array([f"k{i}" for i in range(n)]), "group": np.array([""] * n),
            "prompt": np.array([f"p{i}" for i in range(n)]),
            "image": rng.integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)}


def test_metric_actor_features_scores_and_grid_png():
    actor = MetricActor({"extractor": "thumbnail:2", "scorers": ["mean_intensity"]}, grid_keys=("k1",))
    b = _batch()
    out = actor(b)
    assert "image" not in out and out["features"].shape == (6, 12)
    np.testing.assert_allclose(out["score_mean_intensity"], b["image"].reshape(6, -1).mean(1) / 255, rtol=1e-5)
    assert [len(p) > 0 for p in out["png"]] == [False, True, False, False, False, False]
    coco = MetricActor({"extractor": "thumbnail:2", "scorers": [], "protocol_size": 8})(b)
    assert coco["features"].shape == (6, 12)  # after the 8 px protocol resize
    scores_only = MetricActor({"extractor": "none", "scorers": ["mean_intensity"]})(b)
    assert "features" not in scores_only and "score_mean_intensity" in scores_only


def test_partial_stats_merge_exactly():
    feats = np.random.default_rng(1).normal(size=(300, 5))
    parts = [partial_stats({"features": c}) for c in np.array_split(feats, 4)]
    rows = [{k: v[0] for k, v in p.items()} for p in parts]
    merged = merge_partials(rows[::-1])
    whole = GaussianStats.from_features(feats)
    assert merged.n == 300
    np.testing.assert_allclose(merged.sum_outer, whole.sum_outer, rtol=1e-13)
    other = GaussianStats.from_features(feats[:200] + 0.1)
    assert abs(frechet_distance(merged, other) - frechet_distance(whole, other)) < 1e-10


def test_compute_metrics_groups_and_reference():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(200, 4)).astype(np.float32)
    rows = [{"features": f, "group": g, "score_x": s}
            for f, g, s in zip(rng.normal(size=(100, 4)), ["a", "b"] * 50, np.arange(100.0))]
    stats = GaussianStats.from_features(np.stack([r["features"] for r in rows]))
    ref = Reference(GaussianStats.from_features(real), real, {"extractor": "t"})
    m = compute_metrics(rows, stats, ref, SPEC)
    assert m["x"] == pytest.approx(49.5) and m["x/a"] == pytest.approx(49.0) and m["x/b"] == pytest.approx(50.0)
    assert 0 < m["precision"] <= 1 and 0 < m["recall"] <= 1 and m["fid"] == pytest.approx(
        frechet_distance(stats, ref.stats), abs=1e-9)


def test_reference_roundtrip_local_and_s3(tmp_path, s3_bucket):
    feats = np.random.default_rng(3).normal(size=(50, 6)).astype(np.float32)
    ref = Reference(GaussianStats.from_features(feats), feats, {"extractor": "thumbnail:2", "file_list_sha256": "ab"})
    for uri in (str(tmp_path / "ref"), f"s3://{s3_bucket}/ref"):
        assert not Reference.exists(uri)
        ref.save(uri)
        assert Reference.exists(uri)
        back = Reference.load(uri)
        np.testing.assert_array_equal(back.features, feats)
        assert back.manifest == ref.manifest and back.stats.n == 50


def test_list_checkpoints(tmp_path, tiny_pipeline_dir):
    root = tmp_path / "ckpts"
    shutil.copytree(tiny_pipeline_dir, root / "checkpoint_000020" / "export")
    (root / "checkpoint_000010").mkdir(parents=True)
    (root / "checkpoint_000010" / "student_adapter.safetensors").write_bytes(b"x")
    (root / "checkpoint_000030").mkdir()
    (root / "checkpoint_000030" / "train_state.safetensors").write_bytes(b"x")  # not evaluable (yet)
    found = list_checkpoints(str(root))
    assert [(c.id, c.step) for c in found] == [("checkpoint_000010", 10), ("checkpoint_000020", 20)]
    assert found[0].adapter.endswith("student_adapter.safetensors") and found[0].pipeline is None
    assert found[1].pipeline.endswith("checkpoint_000020/export")

    # the same layout logged as MLflow artifacts of a training run
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("train", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(exp).info.run_id
    client.log_artifacts(run, str(root), "checkpoints")
    logged = list_checkpoints(f"runs:/{run}/checkpoints", tracking_uri=uri)
    assert [(c.id, c.step) for c in logged] == [("checkpoint_000010", 10), ("checkpoint_000020", 20)]
    assert logged[0].adapter == f"runs:/{run}/checkpoints/checkpoint_000010/student_adapter.safetensors"
    assert logged[1].pipeline == f"runs:/{run}/checkpoints/checkpoint_000020/export"


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory) -> str:
    from wadi_core.models.tiny import save_tiny_pipeline

    return str(save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe", "sd", seed=0))


# ------------------------------------------------------------------------------ Ray (slow)
@pytest.mark.ray
@pytest.mark.slow
def test_evaluate_and_schedule_each_checkpoint_once(ray_local, tiny_pipeline_dir, tmp_path):
    import mlflow

    from pipelines.evaluate.runs import run_evaluation

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    train_exp = client.create_experiment("train")
    train_run = client.create_run(train_exp, run_name="distill").info.run_id
    cfg = EvaluationRun(
        model=ModelSpec(uri=tiny_pipeline_dir, steps=1), prompts="domain:12:0:train", metrics=SPEC,
        reference=str(tmp_path / "ref"), reference_images="domain:40:1:train", out=str(tmp_path / "eval"),
        grid=4, ray=RayResources(gen_workers=1, metric_workers=1, batch_size=6, cpus_per_actor=0.5),
        tracking=EvaluationTracking(experiment="wadi-eval", tracking_uri=uri, train_run_id=train_run),
    )
    result = run_evaluation(replace(cfg, out=str(tmp_path / "eval" / "single")))
    m = result["metrics"]
    assert m["num_images"] == 12 and np.isfinite(m["fid"]) and 0 <= m["precision"] <= 1
    assert Reference.exists(str(tmp_path / "ref"))
    assert Reference.load(str(tmp_path / "ref")).manifest["num_images"] == 40
    assert (tmp_path / "eval" / "single" / "grid.png").exists()
    assert len(list((tmp_path / "eval" / "single" / "images" / "images").glob("*.png"))) == 12
    summary = json.loads((tmp_path / "eval" / "single" / "metrics.json").read_text())
    assert summary["metrics"]["fid"] == pytest.approx(m["fid"]) and len(summary["prompts"]["sha256"]) == 64

    # scheduled mode over a checkpoint folder: each checkpoint once, new ones picked up later; no
    # --train-run-id: each evaluation finds its training run in the checkpoint's own train_state.json
    ckpts = tmp_path / "ckpts"

    def add_checkpoint(name: str) -> None:
        shutil.copytree(tiny_pipeline_dir, ckpts / name / "export")
        (ckpts / name / "train_state.json").write_text(json.dumps({"step": int(name[-6:]), "mlflow_run_id": train_run}))

    add_checkpoint("checkpoint_000010")
    add_checkpoint("checkpoint_000020")
    sched = replace(cfg, out=str(tmp_path / "eval" / "sched"), save_images="none",
                    tracking=replace(cfg.tracking, train_run_id=None))
    assert run_schedule(sched, str(ckpts), teacher=tiny_pipeline_dir) == ["checkpoint_000010", "checkpoint_000020"]
    assert run_schedule(sched, str(ckpts), teacher=tiny_pipeline_dir) == []
    add_checkpoint("checkpoint_000030")
    assert run_schedule(sched, str(ckpts), teacher=tiny_pipeline_dir) == ["checkpoint_000030"]

    runs = mlflow.search_runs(experiment_ids=[train_exp], output_format="list",
                              filter_string="tags.`wadi.checkpoint_source` != ''")
    ids = sorted(r.data.tags["wadi.checkpoint_id"] for r in runs)
    assert ids == ["checkpoint_000010", "checkpoint_000020", "checkpoint_000030"]  # once each
    assert all(r.data.tags["mlflow.parentRunId"] == train_run for r in runs)
    assert all("fid" in r.data.metrics for r in runs)
    # reference statistics from a folder of real photos of mixed sizes (COCO protocol resize)
    import hashlib

    from PIL import Image

    from pipelines.evaluate.metrics import build_reference

    photos = tmp_path / "val2014"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(30, 40), (50, 20), (24, 24), (33, 61), (40, 30), (16, 48)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(photos / f"COCO_{i:03d}.png")
    ref = build_reference(str(photos), replace(SPEC, protocol_size=16), batch_size=4, cpus_per_actor=0.5)
    names = [f"COCO_{i:03d}.png" for i in range(6)]
    assert ref.manifest["num_images"] == 6 and ref.stats.n == 6 and ref.features.shape == (6, 12)
    assert ref.manifest["file_list_sha256"] == hashlib.sha256(("\n".join(names) + "\n").encode()).hexdigest()

    # The single evaluation's run: named by model, steps, guidance and prompt set; its duration is the work's.
    (single,) = [r for r in mlflow.search_runs(experiment_ids=[train_exp], output_format="list")
                 if "wadi.checkpoint_id" not in r.data.tags and r.info.run_id != train_run]
    assert single.info.run_name.startswith(f"{Path(tiny_pipeline_dir).name}-1step-cfg1-domain:12:0:train-")
    assert (single.info.end_time - single.info.start_time) / 1000 >= 0.9 * m["eval_seconds"] > 0

    history = client.get_metric_history(train_run, "eval/fid")
    assert sorted(h.step for h in history) == [0, 10, 20, 30]
    assert client.get_run(train_run).info.status == "RUNNING"  # the training run is left alone


def test_compare_runs_table_and_plot(tmp_path):
    import importlib

    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("wadi-eval")
    for name, steps, fid in (("teacher-25step", 25, 3.5), ("student-1step", 1, 4.25)):
        run = client.create_run(exp, run_name=name).info.run_id
        client.log_param(run, "model.steps", steps)
        client.log_metric(run, "fid", fid)
        client.log_metric(run, "alignment", 0.9)
        client.set_terminated(run)
    job = importlib.import_module("jobs.compare_runs")
    rows = job.main(["experiments=[wadi-eval]", f"tracking_uri={uri}", f"out={tmp_path / 'cmp'}"])
    assert [r["run"] for r in rows] == ["teacher-25step", "student-1step"]
    md = (tmp_path / "cmp.md").read_text()
    assert "| teacher-25step |" in md and "4.25" in md and "alignment" in md
    csv_lines = (tmp_path / "cmp.csv").read_text().splitlines()
    assert csv_lines[0].endswith("fid,alignment") and len(csv_lines) == 3
    assert (tmp_path / "cmp.png").stat().st_size > 1000


def test_compare_runs_pages_through_more_runs_than_one_page(tmp_path):
    import importlib

    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("many")
    for i in range(7):
        run = client.create_run(exp, run_name=f"r{i}", start_time=1_000 + i // 2).info.run_id  # ties too
        client.log_metric(run, "fid", float(i))
    job = importlib.import_module("jobs.compare_runs")
    rows = job.fetch_runs(["many"], uri, page_size=3)  # 3 + 3 + 1
    assert sorted(r["run"] for r in rows) == [f"r{i}" for i in range(7)]
    assert {r["run"] for r in rows[:2]} == {"r0", "r1"} and rows[-1]["run"] == "r6"  # oldest first
    with pytest.raises(SystemExit, match=r"^2$") as exc:  # a config error: status 2, the message on stderr
        job.main(["experiments=[many]", f"tracking_uri={uri}", "page_size=5000"])
    assert exc.value.code == 2


def test_evaluation_run_links_prompt_dataset_logged_model_and_training_run(tmp_path, tiny_pipeline_dir):
    """An evaluation of a registered model: the prompt set is a dataset input (named and digested by
    its sha256), the metrics belong to the model's LoggedModel, the run sits under the training run."""
    import mlflow

    from pipelines.evaluate.runs import _log_mlflow
    from pipelines.evaluate.generation import load_prompts
    from pipelines.tracking.registry import log_and_register
    from pipelines.tracking.client import start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with start_run("train", run_name="distill", tracking_uri=uri) as train:
        model = log_and_register(tiny_pipeline_dir, "tiny-wadi", "candidate", uri)
    assert model is not None and model["model_id"]
    records, prompt_info = load_prompts("domain:6:0:train")
    cfg = EvaluationRun(model=ModelSpec(uri="models:/tiny-wadi@candidate", steps=1), prompts="domain:6:0:train",
                     metrics=SPEC, out=str(tmp_path / "empty-out"),
                     tracking=EvaluationTracking(tracking_uri=uri, train_run_id=train.run_id, checkpoint_id="final"))
    _log_mlflow(cfg, {"fid": 12.5, "mean_intensity": 0.4}, prompt_info, None, records)

    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_run(train.run_id).info.experiment_id],
                                filter_string="tags.`wadi.kind` = 'evaluation'")
    assert run.data.tags["mlflow.parentRunId"] == train.run_id and run.data.tags["wadi.model_id"] == model["model_id"]
    (dataset_input,) = run.inputs.dataset_inputs
    sha = prompt_info["sha256"]
    assert dataset_input.dataset.name == f"prompts-{sha}" and dataset_input.dataset.digest == sha[:32]
    tags = {t.key: t.value for t in dataset_input.tags}
    assert tags["mlflow.data.context"] == "evaluation" and tags["prompts.source"] == "domain:6:0:train"
    assert json.loads(dataset_input.dataset.schema)["mlflow_colspec"][2]["name"] == "prompt"
    model_inputs = client.get_run(run.info.run_id).inputs.model_inputs  # search_runs leaves them out
    assert [m.model_id for m in model_inputs] == [model["model_id"]]
    logged = client.get_logged_model(model["model_id"])
    by_key = {m.key: m for m in logged.metrics}
    assert by_key["fid"].value == 12.5 and by_key["fid"].run_id == run.info.run_id
    assert by_key["fid"].dataset_digest == sha[:32]
    # a checkpoint folder is not a logged model: no link, no warning-free failure
    from pipelines.evaluate.runs import logged_model_id

    assert logged_model_id(tiny_pipeline_dir, uri) is None
