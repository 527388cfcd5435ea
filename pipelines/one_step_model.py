"""MLflow "model from code" for an exported one-step pipeline (no pickled Python objects).

MLflow copies this file into the logged model and executes it on load, so it must stay
self-contained: it imports nothing from this project.
"""

from __future__ import annotations

import mlflow.models
import mlflow.pyfunc


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


mlflow.models.set_model(OneStepPipelineModel())
