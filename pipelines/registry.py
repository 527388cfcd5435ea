"""The exported one-step pipeline as an MLflow model, registered under a name with an alias."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc

__all__ = ["MODEL_CODE", "log_and_register"]


# The pyfunc class lives in its own file, logged as a "model from code": loading the registered
# model then executes that reviewed source instead of unpickling a Python object.
MODEL_CODE = Path(__file__).with_name("one_step_model.py")


def log_and_register(export_dir: str | Path, registered_name: str, alias: str,
                     tracking_uri: str) -> dict[str, Any] | None:
    """Log ``export_dir`` as a pyfunc model of the active run, register it, point ``alias`` at it.

    Returns ``{"model_uri", "name", "version", "alias"}``, or None (with a warning) when MLflow fails.
    """
    try:
        info = mlflow.pyfunc.log_model(
            name="one_step_pipeline",
            python_model=str(MODEL_CODE),
            artifacts={"pipeline": str(export_dir)},
            # Explicit requirements: inferring them would import-scan the environment (slow).
            pip_requirements=["torch", "diffusers", "transformers", "safetensors"],
            registered_model_name=registered_name,
        )
        version = info.registered_model_version
        client = mlflow.MlflowClient(tracking_uri)
        if version is not None:
            client.set_registered_model_alias(registered_name, alias, str(version))
        return {"model_uri": info.model_uri, "name": registered_name, "version": version, "alias": alias}
    except Exception as e:  # noqa: BLE001 - registration must not fail a finished run
        warnings.warn(f"MLflow model registration failed ({type(e).__name__}: {e}); the export is still at "
                      f"{export_dir}")
        return None
