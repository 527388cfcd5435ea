"""MLflow "model from code" for an exported one-step pipeline (no pickled Python objects).

MLflow copies this file into the logged model and executes it on load, so it must stay
self-contained: it imports nothing from this project.

Device and dtype come from the model config (``log_model(model_config=...)``, or
``mlflow.pyfunc.load_model(uri, model_config={"device": "cuda", "dtype": "float16"})`` when
loading): ``device`` "auto" picks CUDA when there is one; ``dtype`` "auto" is float16 on CUDA
and float32 on CPU. ``predict`` takes a ``seed`` param (same seed, same images).
"""

from __future__ import annotations

import mlflow.models
import mlflow.pyfunc
import numpy as np

_DTYPES = ("auto", "float32", "float16", "bfloat16")


class OneStepPipelineModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: ``predict(["a prompt", ...])`` -> uint8 images (N, H, W, 3), one step each."""

    def load_context(self, context):  # noqa: ANN001 - MLflow inspects these signatures
        import torch  # noqa: PLC0415 -- torch only here; the module imports without it
        from diffusers import DiffusionPipeline  # noqa: PLC0415 -- diffusers models: seconds to import

        config = dict(context.model_config or {})
        device = str(config.get("device", "auto"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype_name = str(config.get("dtype", "auto"))
        if dtype_name not in _DTYPES:
            raise ValueError(f"model_config dtype must be one of {_DTYPES}, got {dtype_name!r}")
        if dtype_name == "auto":
            dtype_name = "float16" if device.startswith("cuda") else "float32"
        self.device = device
        self.pipe = DiffusionPipeline.from_pretrained(context.artifacts["pipeline"],
                                                      torch_dtype=getattr(torch, dtype_name)).to(device)
        self.pipe.set_progress_bar_config(disable=True)

    def predict(self, context, model_input, params=None):  # noqa: ANN001 - untyped: MLflow reads type hints
        import torch  # noqa: PLC0415 -- torch only here; the module imports without it

        if hasattr(model_input, "iloc"):  # a DataFrame: the "prompt" column (the signature's input)
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            prompts = [str(p) for p in model_input[column]]
        else:
            prompts = [str(p) for p in (model_input if isinstance(model_input, (list, tuple)) else
                                        np.asarray(model_input).ravel())]
        seed = int((params or {}).get("seed", 0))
        # The generator lives on the CPU so that the same seed gives the same noise on any device.
        out = self.pipe(prompts, num_inference_steps=1, guidance_scale=1.0, output_type="np",
                        generator=torch.Generator().manual_seed(seed))
        return (np.asarray(out.images, dtype=np.float32) * 255).round().astype("uint8")


mlflow.models.set_model(OneStepPipelineModel())
