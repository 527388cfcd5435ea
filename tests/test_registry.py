"""The export is registered as an MLflow model from code (no pickle) and samples in one step."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wadi_core.export import export_one_step_pipeline
from wadi_core.models import load_teacher
from wadi_core.models.tiny import save_tiny_pipeline
from wadi_core.vsd import AdapterSpec, VSDConfig, WaDiDistiller


def test_registered_model_loads_from_code_and_samples(tmp_path):
    import mlflow

    from pipelines.registry import log_and_register
    from pipelines.tracking import start_run

    d = WaDiDistiller(load_teacher(save_tiny_pipeline(tmp_path / "teacher", "sd")),
                      VSDConfig(student=AdapterSpec("lorad", 4), fake=AdapterSpec("lorad", 2)))
    export = export_one_step_pipeline(d, tmp_path / "export")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with start_run("reg", tracking_uri=uri) as run:
        assert run.active
        info = log_and_register(export, "tiny-wadi", "candidate", uri)
    assert info is not None and int(info["version"]) == 1
    mlflow.set_tracking_uri(uri)
    model_dir = mlflow.artifacts.download_artifacts(info["model_uri"], tracking_uri=uri)
    files = {p.name for p in Path(model_dir).rglob("*")}
    assert "one_step_model.py" in files and not any(f.endswith((".pkl", ".cloudpickle")) for f in files)
    images = mlflow.pyfunc.load_model("models:/tiny-wadi@candidate").predict(["a red circle", "a blue square"])
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
