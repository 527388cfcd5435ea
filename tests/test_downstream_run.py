"""The downstream jobs' one MLflow-run helper: name, tag, redacted params, outputs, end status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")

from pipelines.tracking.downstream import downstream_run  # noqa: E402


def test_a_finished_run_has_its_outputs_and_redacted_params(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "dreambooth-out"
    out.mkdir()
    (out / "grid.png").write_bytes(b"png")
    (out / "adapters").mkdir()
    (out / "adapters" / "a.safetensors").write_bytes(b"x")
    params = {"teacher": "s3://alice:s3cret@bucket/teacher", "steps": 3}
    with downstream_run("dreambooth", out, "wadi-downstream", uri, params=params, started=0.0) as run:
        result = run.finish({"rows": {"a": 1.0}}, "| a |", files=("grid.png", "metrics.json"), folders=("adapters",),
                            metrics={"extra": 2.0})
    assert "alice" not in (out / "metrics.json").read_text() and "s3cret" not in run.where()
    assert json.loads((out / "metrics.json").read_text())["rows"] == {"a": 1.0}
    assert (out / "table.md").read_text() == "| a |" and result["wall_seconds"] > 1e9  # from started=0
    got = mlflow.MlflowClient(uri).get_run(result["mlflow_run_id"])
    assert got.info.run_name == "dreambooth-dreambooth-out" and got.info.status == "FINISHED"
    assert got.data.tags["wadi.task"] == "dreambooth" and got.data.metrics["extra"] == 2.0
    assert "s3cret" not in got.data.params["teacher"] and got.data.params["steps"] == "3"
    names = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(got.info.run_id)}
    assert {"grid.png", "metrics.json", "adapters"} <= names


def test_a_failing_job_leaves_a_failed_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(RuntimeError, match="boom"):
        with downstream_run("reversion", tmp_path, "wadi-downstream", uri, run_name="r1") as run:
            run_id = run.tracker.run_id
            raise RuntimeError("boom")
    assert mlflow.MlflowClient(uri).get_run(run_id).info.status == "FAILED"
