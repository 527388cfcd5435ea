"""The exported one-step pipeline as an MLflow model, registered under a name with an alias."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc

__all__ = ["OneStepPipelineModel", "log_and_register"]


class OneStepPipelineModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: ``predict(["a prompt", ...])`` -> uint8 images (N, H, W, 3), one step each."""

    def load_context(self, context):  # noqa: ANN001 - MLflow inspects these signatures
        from diffusers import DiffusionPipeline

        self.pipe = DiffusionPipeline.from_pretrained(context.artifacts["pipeline"])

    def predict(self, context, model_input, params=None):  # noqa: ANN001 - untyped: MLflow reads type hints
        import numpy as np
        import torch

        prompts = list(model_input.iloc[:, 0]) if hasattr(model_input, "iloc") else list(model_input)
        seed = int((params or {}).get("seed", 0))
        out = self.pipe(prompts, num_inference_steps=1, guidance_scale=1.0, output_type="np",
                        generator=torch.Generator().manual_seed(seed))
        return (np.asarray(out.images) * 255).round().astype("uint8")


def log_and_register(export_dir: str | Path, registered_name: str, alias: str,
                     tracking_uri: str) -> dict[str, Any] | None:
    """Log ``export_dir`` as a pyfunc model of the active run, register it, point ``alias`` at it.

    Returns ``{"model_uri", "name", "version", "alias"}``, or None (with a warning) when MLflow fails.
    """
    try:
        info = mlflow.pyfunc.log_model(
            name="one_step_pipeline",
            python_model=OneStepPipelineModel(),
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
