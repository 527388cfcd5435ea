"""The exported one-step pipeline as an MLflow model, registered under a name with an alias.

The model is the one copy of the export in MLflow (the training run references it by its
``models:/<model_id>`` URI, tag ``wadi.export_model_uri``); it carries a signature (prompts in,
uint8 images out, a ``seed`` param), its device / dtype choice as model config, and pip
requirements pinned to the versions in constraints.txt.
"""

from __future__ import annotations

import re
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

__all__ = ["MODEL_CODE", "REQUIREMENTS", "model_signature", "pinned_requirements", "log_and_register",
           "attach_quality"]


# The pyfunc class lives in its own file, logged as a "model from code": loading the registered
# model then executes that reviewed source instead of unpickling a Python object.
MODEL_CODE = Path(__file__).with_name("one_step_model.py")
CONSTRAINTS = Path(__file__).resolve().parents[2] / "constraints.txt"
# What loading and running the model needs (mlflow itself is added by MLflow).
REQUIREMENTS = ("torch", "diffusers", "transformers", "safetensors", "accelerate", "numpy", "pillow")


def pinned_requirements(packages: tuple[str, ...] = REQUIREMENTS,
                        constraints: Path = CONSTRAINTS) -> list[str]:
    """``name==version`` for each package: the pin in constraints.txt, else the installed version.

    Inferring requirements would import-scan the environment (slow) and an unpinned name lets a
    serving image resolve other versions than the ones the model was trained and tested with.
    """
    pins: dict[str, str] = {}
    if constraints.is_file():
        for line in constraints.read_text().splitlines():
            m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)", line)
            if m:
                pins[re.sub(r"[-_.]+", "-", m.group(1).lower())] = m.group(2)
    out = []
    for name in packages:
        key = re.sub(r"[-_.]+", "-", name.lower())
        version = pins.get(key)
        if version is None:
            try:
                version = metadata.version(name)
            except metadata.PackageNotFoundError:
                raise ValueError(f"{name} is neither pinned in {constraints} nor installed: pin it") from None
        out.append(f"{name}=={version}")
    return out


def model_signature() -> Any:
    """Input: prompt strings (a list, or a one-column DataFrame); output: uint8 images (N, H, W, 3);
    param ``seed``. The input column is unnamed so that a plain list of prompts passes MLflow's
    schema check."""
    from mlflow.models import ModelSignature  # noqa: PLC0415 -- MLflow is optional and slow to import
    from mlflow.types import (ColSpec, ParamSchema, ParamSpec, Schema,  # noqa: PLC0415 -- optional, slow import
                              TensorSpec)

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([TensorSpec(np.dtype("uint8"), (-1, -1, -1, 3), "images")]),
        params=ParamSchema([ParamSpec("seed", "long", 0)]),
    )


def log_and_register(export_dir: str | Path, registered_name: str, alias: str,
                     tracking_uri: str, device: str = "auto", dtype: str = "auto") -> dict[str, Any] | None:
    """Log ``export_dir`` as a pyfunc model of the active run, register it, point ``alias`` at it.

    ``device`` / ``dtype`` ("auto": CUDA + float16 when there is a GPU, else CPU + float32) are the
    model config's defaults; a loader can override them. Returns ``{"model_uri", "model_id",
    "name", "version", "alias"}``, or None (with a warning) when MLflow fails.
    """
    try:
        info = mlflow.pyfunc.log_model(
            name="one_step_pipeline",
            python_model=str(MODEL_CODE),
            artifacts={"pipeline": str(export_dir)},
            model_config={"device": device, "dtype": dtype},
            signature=model_signature(),
            pip_requirements=pinned_requirements(),
            registered_model_name=registered_name,
        )
        version = info.registered_model_version
        client = mlflow.MlflowClient(tracking_uri)
        if version is not None:
            client.set_registered_model_alias(registered_name, alias, str(version))
        return {"model_uri": info.model_uri, "model_id": info.model_id, "name": registered_name,
                "version": version, "alias": alias}
    except Exception as e:  # noqa: BLE001 - registration must not fail a finished run
        warnings.warn(f"MLflow model registration failed ({type(e).__name__}: {e}); the export is still at "
                      f"{export_dir}")
        return None


def attach_quality(model: dict[str, Any], metrics: dict[str, float], run_id: str, tracking_uri: str,
                   summary: str) -> None:
    """Put the closing evaluation on the model itself: ``metrics`` on the LoggedModel (``model_id``,
    logged from the training run ``run_id``), as tags of the registered version, and ``summary``
    (the printed table) as the version's description. Warns instead of failing the finished run."""
    try:
        client = mlflow.MlflowClient(tracking_uri)
        for key, value in metrics.items():
            client.log_metric(run_id, key, float(value), model_id=model["model_id"])
        if model.get("version") is not None:
            version = str(model["version"])
            for key, value in metrics.items():
                client.set_model_version_tag(model["name"], version, key, f"{float(value):.4g}")
            # A code block: the UI renders descriptions as markdown, which would fold the table's columns.
            client.update_model_version(model["name"], version, description=f"```\n{summary}\n```")
    except Exception as e:  # noqa: BLE001 - the run and the registration stand
        warnings.warn(f"could not attach the evaluation to model {model.get('name')} ({type(e).__name__}: {e})")
