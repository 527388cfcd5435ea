"""The distillation job's closing evaluation: student vs (cached) teacher, logged on the training run."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipelines.config.job import DistillConfig, load_config
from pipelines.evaluate.config import FinalEvaluationConfig, MetricsSpec, RayResources
from pipelines.evaluate.final import METRICS, final_evaluation, format_table


def test_table_lists_both_models_and_the_ratio():
    ev = FinalEvaluationConfig(num_prompts=1000)
    table = format_table({"fid": 20.0, "precision": 0.6, "recall": 0.5, "alignment": 0.99},
                         {"fid": 22.0, "precision": 0.55, "recall": 0.6, "alignment": 0.95}, ev)
    lines = table.splitlines()
    assert lines[0].startswith("evaluation on 1,000 prompts")
    assert lines[2].startswith("teacher 25 steps CFG 3") and "20.000" in lines[2]
    assert lines[3].startswith("student 1 step") and "22.000" in lines[3]
    assert "1.10x" in lines[4] and "0.92x" in lines[4]


def test_config_rejects_bad_values():
    from wadi_core.config import ConfigError

    with pytest.raises(ConfigError, match="num_prompts >= 0"):
        FinalEvaluationConfig(num_prompts=-1)


def test_teacher_cache_key_is_the_one_before_the_section_embedded_the_protocol(tmp_path):
    """A teacher evaluated before ``evaluation:`` embedded the protocol is found in the cache again."""
    import hashlib
    import json

    from pipelines.evaluate.final import _teacher_key

    cfg = DistillConfig(teacher=str(tmp_path / "no-such-teacher"))
    ev = FinalEvaluationConfig(num_prompts=1000, metrics=MetricsSpec(extractor="domain", scorers=("domain", "clip:/w")))
    earlier = {"num_prompts": 1000, "prompts": "domain:1000:1:train", "seed": 0, "teacher_steps": 25,
               "teacher_guidance": 3.0, "extractor": "domain", "scorers": "domain,clip:/w",
               "reference": "outputs/eval/reference/domain-5000-777-train",
               "reference_images": "domain:5000:777:train"}
    key = json.dumps([cfg.teacher, earlier], sort_keys=True)
    assert _teacher_key(cfg, ev) == hashlib.sha256(key.encode()).hexdigest()[:16]
    # resources do not change the numbers; a protocol setting the earlier section lacked does
    assert _teacher_key(cfg, dataclasses.replace(ev, ray=RayResources(batch_size=8), grid=4)) == _teacher_key(cfg, ev)
    assert _teacher_key(cfg, dataclasses.replace(ev, draw_seed=7)) != _teacher_key(cfg, ev)


def test_moved_evaluation_keys_say_where_they_went():
    from wadi_core.config import ConfigError

    with pytest.raises(ConfigError, match=r"evaluation.gen_workers is now evaluation.ray.gen_workers"):
        load_config("embedded", ["evaluation.gen_workers=2"])
    cfg = load_config("embedded", ["evaluation.ray.gen_workers=2", "evaluation.metrics.scorers=[domain]"])
    assert cfg.evaluation.ray.gen_workers == 2 and cfg.evaluation.ray.batch_size == 64
    assert cfg.evaluation.num_prompts == 1000 and cfg.evaluation.teacher_steps == 25


@pytest.mark.slow
@pytest.mark.ray
def test_final_evaluation_logs_on_the_training_run_and_caches_the_teacher(ray_local, tmp_path, monkeypatch):
    import mlflow

    from wadi_core.export import export_one_step_pipeline
    from wadi_core.models import load_teacher
    from wadi_core.vsd import AdapterSpec, VSDConfig, WaDiDistiller

    import pipelines.evaluate.runs as eval_runs
    from pipelines.tracking.client import start_run

    # An (untrained) one-step export of the embedded teacher stands in for a student.
    torch.manual_seed(0)
    distiller = WaDiDistiller(load_teacher("embedded"), VSDConfig(student=AdapterSpec("lorad", 4),
                                                                  fake=AdapterSpec("lorad", 4)))
    export = export_one_step_pipeline(distiller, tmp_path / "export")
    ev = FinalEvaluationConfig(num_prompts=24, prompts="domain:24:1:train", teacher_steps=4,
                               reference=str(tmp_path / "ref"), reference_images="domain:64:777:train", grid=8,
                               ray=RayResources(batch_size=16))
    cfg = dataclasses.replace(DistillConfig(), evaluation=ev,
                              train=dataclasses.replace(DistillConfig().train, storage_path=str(tmp_path / "ray"),
                                                        run_name="final-eval-test"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    calls = []
    real = eval_runs.run_evaluation
    monkeypatch.setattr(eval_runs, "run_evaluation", lambda c: calls.append(c.model.uri) or real(c))

    with start_run("final-eval", run_name="train", tracking_uri=uri) as tracker:
        pass  # the training run, closed before the evaluation as in pipelines.run
    out = final_evaluation(cfg, str(export), tracker.run_id, tmp_path, tracking_uri=uri, step=7)
    assert calls == ["embedded", str(export)]  # teacher, then student
    for role in ("teacher", "student"):
        assert set(METRICS) <= set(out[role]), out[role]
        assert out[role]["fid"] > 0 and 0 <= out[role]["precision"] <= 1
    assert out["metrics"]["final/fid_ratio_lower_better"] == pytest.approx(out["student"]["fid"] / out["teacher"]["fid"])
    assert out["metrics"]["final/precision_ratio_higher_better"] == pytest.approx(
        out["student"]["precision"] / out["teacher"]["precision"])

    client = mlflow.MlflowClient(uri)
    train = client.get_run(tracker.run_id)
    assert train.info.status == "FINISHED"
    for k in ("final/student_fid", "final/teacher_fid", "final/fid_ratio_lower_better", "final/student_precision",
              "final/precision_ratio_higher_better"):
        assert k in train.data.metrics
    assert not [k for k in train.data.metrics if k.startswith("eval/")], "eval/* would repeat final/student_*"
    teacher_run = client.get_run(train.data.tags["wadi.teacher_eval_run_id"])  # linked to its reference run
    assert teacher_run.info.run_name.startswith("teacher-4step-cfg3-domain:24:1:train-")
    assert "metrics.clip_model" not in teacher_run.data.params  # a domain evaluation: no CLIP
    assert "not comparable to Inception FID" in teacher_run.data.params["fid.features"]
    assert "final_eval/teacher_vs_student.png" in [f.path for f in client.list_artifacts(tracker.run_id,
                                                                                          "final_eval")]
    nested = client.search_runs([train.info.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{tracker.run_id}'")
    assert [r.info.run_name for r in nested] == ["final-eval-test-final-1step"]

    # A second job with the same teacher and prompts reuses the teacher's numbers.
    calls.clear()
    again = final_evaluation(cfg, str(export), None, tmp_path, tracking_uri=uri)
    assert calls == [str(export)] and again["teacher"] == out["teacher"]
    assert again["student"]["fid"] == pytest.approx(out["student"]["fid"])  # same prompts, same noise


def test_the_evaluation_is_attached_to_the_logged_model_and_its_version(tmp_path):
    """What a person finds on the model page: the closing evaluation's metrics on the LoggedModel, as
    tags of the registered version and the table as its description (read back with the client)."""
    import mlflow

    from pipelines.tracking.registry import attach_quality
    from pipelines.tracking.client import start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with start_run("q", run_name="train", tracking_uri=uri) as tracker:
        logged = mlflow.create_external_model(name="one_step_pipeline")
    version = mlflow.register_model(f"models:/{logged.model_id}", "wadi-q")
    model = {"model_id": logged.model_id, "name": "wadi-q", "version": version.version, "alias": "candidate"}
    metrics = {"final/student_fid": 19.17, "final/fid_ratio_lower_better": 1.22,
               "final/precision_ratio_higher_better": 0.83}
    attach_quality(model, metrics, tracker.run_id, uri, "evaluation on 1,000 prompts\n(table)")
    client = mlflow.MlflowClient(uri)
    on_model = {m.key: m.value for m in client.get_logged_model(logged.model_id).metrics}
    assert on_model == pytest.approx(metrics)
    mv = client.get_model_version("wadi-q", version.version)
    assert mv.tags["final/fid_ratio_lower_better"] == "1.22" and mv.tags["final/student_fid"] == "19.17"
    assert mv.description == "```\nevaluation on 1,000 prompts\n(table)\n```"  # a code block keeps the columns


def test_a_run_logged_after_its_work_shows_the_work_s_duration(tmp_path):
    import time

    import mlflow

    from pipelines.tracking.client import start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with start_run("q", run_name="eval", tracking_uri=uri, tags={"wadi.kind": "evaluation"},
                   started_at=time.time() - 51.0) as run:
        run.log_metrics({"fid": 1.0})
    info = mlflow.MlflowClient(uri).get_run(run.run_id)
    assert 51.0 <= (info.info.end_time - info.info.start_time) / 1000 < 80
    assert info.info.run_name == "eval" and info.data.tags["wadi.kind"] == "evaluation"
    assert info.info.status == "FINISHED"


def test_the_side_by_side_grid_says_which_side_is_which():
    import numpy as np
    from PIL import Image

    from wadi_core.images import labelled_panels

    white = Image.new("RGB", (64, 40), "white")
    out = np.asarray(labelled_panels([("teacher: 25 steps, CFG 3", white), ("student: 1 step", white)], gap=8))
    assert out.shape == (30 + 40, 64 + 8 + 64, 3)
    strip, tiles = out[:30], out[30:]
    assert (strip[:, :64] < 128).any() and (strip[:, 72:] < 128).any(), "each panel has its caption"
    assert (tiles == 255).all()  # the panels themselves are untouched


def test_evaluation_params_name_only_what_applies():
    from pipelines.evaluate.config import MetricsSpec

    domain = MetricsSpec().describe()
    assert "metrics.clip_model" not in domain and "metrics.hps_model" not in domain
    assert domain["fid.features"].startswith("the embedded domain classifier")
    coco = MetricsSpec(extractor="inception:/w/pt_inception.pth", scorers=("clip:/w/clip.bin",)).describe()
    assert coco["metrics.clip_model"] == "ViT-g-14" and "metrics.hps_model" not in coco
    assert coco["fid.features"] == "Inception-v3 pool3 (2048-d): the standard FID"
