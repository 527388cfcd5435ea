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

    from pipelines.tracking.registry import log_and_register
    from pipelines.tracking.client import start_run

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

    # signature: prompts in, uint8 images out, a seed param
    model_info = mlflow.models.get_model_info(info["model_uri"])
    assert info["model_id"] == model_info.model_id
    signature = model_info.signature
    assert len(signature.inputs.inputs) == 1 and signature.inputs.input_types()[0].name == "string"
    assert signature.outputs.inputs[0].type == np.dtype("uint8") and signature.outputs.inputs[0].shape[-1] == 3
    assert [(p.name, p.default) for p in signature.params.params] == [("seed", 0)]
    # requirements pinned to constraints.txt (not bare names)
    reqs = (Path(model_dir) / "requirements.txt").read_text().split()
    pins = dict(r.split("==", 1) for r in reqs if "==" in r)
    assert all("==" in r for r in reqs if not r.startswith("-")), reqs
    assert pins["torch"] == _pinned("torch") and pins["diffusers"] == _pinned("diffusers")
    assert pins["transformers"] == _pinned("transformers")
    # device / dtype from the model config, overridable at load time; same seed, same images
    import pandas as pd

    model = mlflow.pyfunc.load_model(info["model_uri"], model_config={"device": "cpu", "dtype": "bfloat16"})
    assert model.model_config == {"device": "cpu", "dtype": "bfloat16"}
    df = pd.DataFrame({"prompt": ["a red circle"]})
    a, b = model.predict(df, params={"seed": 3}), model.predict(df, params={"seed": 3})
    assert a.shape == (1, 32, 32, 3) and np.array_equal(a, b)
    with __import__("pytest").raises(Exception, match="dtype"):
        mlflow.pyfunc.load_model(info["model_uri"], model_config={"dtype": "float8"})


def _pinned(package: str) -> str:
    import re

    text = (Path(__file__).resolve().parents[1] / "constraints.txt").read_text()
    return re.search(rf"^{re.escape(package)}==(\S+)", text, re.M).group(1)


def test_pinned_requirements_refuse_unknown_packages(tmp_path):
    import pytest

    from pipelines.tracking.registry import pinned_requirements

    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch==2.14.1\nSome_Pkg==1.2  # comment\n")
    assert pinned_requirements(("torch", "some-pkg"), constraints) == ["torch==2.14.1", "some-pkg==1.2"]
    with pytest.raises(ValueError, match="neither pinned"):
        pinned_requirements(("surely-not-installed-pkg",), constraints)
