"""Ray / DeepSpeed / MLflow wiring around ``wadi_core``, one sub-package per concern.

- ``config``: the job's typed config (``job``), the one CLI every job shares (``cli``), the run plan (``plan``).
- ``runtime``: the Ray cluster, console lines, stop signals, the run lease, preflight checks, collectives.
- ``data``: prompt datasets and shards (tar and WebDataset), the ControlNet image lake, text encoding.
- ``train``: the Ray Train worker loop, DeepSpeed engines, checkpoints, the ControlNet trainer.
- ``evaluate``: evaluation runs, metrics, image generation, the final evaluation of a distillation.
- ``tracking``: the MLflow client, model registration, the one-step model served from code.
- ``run``: the job driver on top: datasets, TorchTrainer, the MLflow run, registration.
- ``serve``: the one-step student on Ray Serve (``jobs/serve.py``): HTTP API, batching, the page.
"""
