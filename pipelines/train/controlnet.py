"""ControlNet training on Ray Train: image lake -> Ray Data -> data-parallel workers.

The same step as the single-process loop (``wadi_core.downstream.controlnet.controlnet_step``:
the frozen teacher, the Min-SNR epsilon loss and the one-step x0 term) runs in every worker on
its share of the lake (``pipelines.data.control_lake``), with the ControlNet wrapped for data
parallelism by ``ray.train.torch.prepare_model`` (DDP: gloo on CPU, NCCL on GPU). A ControlNet
is ~360 M parameters at SD 1.5 scale, so plain DDP fits every worker; ZeRO would only shard an
optimizer state of a few GB.

Checkpoints (every ``checkpoint_every`` steps and at the end) are reported to Ray Train's storage
(``storage_path``: local or ``s3://``): the ControlNet as a diffusers folder (safetensors), the
AdamW state as safetensors and the step in ``state.json``; no pickle. A restarted worker group
(``max_failures``) or a second run with the same ``run_name`` resumes from the newest one; the
data stream then restarts on a new shuffle (the lake is sampled, not replayed exactly).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from wadi_core import storage
from wadi_core.downstream.controlnet import (ControlNetConfig, build_controlnet, control_tensor, controlnet_step,
                                             drop_captions, load_controlnet)
from wadi_core.downstream.training import encode_renders, snr_weight
from wadi_core.models import load_teacher
from wadi_core.models.teacher import Cond
from wadi_core.redact import redact

from pipelines.data.control_lake import CONTROL_BAD_REASONS, control_dataset, decode_rows
from pipelines.runtime.cluster import init_ray, local_cpus
from pipelines.runtime.cluster import ray_address as resolve_ray_address
from pipelines.runtime.collectives import all_ranks_true, any_rank_true, sum_over_ranks
from pipelines.runtime.preflight import check_worker_cpus
from pipelines.tracking.client import start_run
from pipelines.train.checkpoint import run_storage

__all__ = ["RayControlNetSpec", "run_controlnet_training", "controlnet_train_loop", "save_optimizer",
           "load_optimizer"]

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
CONTROLNET_DIR = "controlnet"


@dataclass(frozen=True)
class RayControlNetSpec:
    """Where and how wide the Ray Train run is (the training itself: ``ControlNetConfig``)."""

    lake: str                        # image lake (pipelines.data.control_lake layout), local or s3://
    teacher: str = "embedded"
    workers: int = 2
    cpus_per_worker: float = 0.5     # leave at least one CPU to Ray Data (checked)
    gpus_per_worker: float = 0.0
    storage_path: str = "runs/ray"   # Ray Train's checkpoints: local or s3://
    run_name: str = "controlnet"
    checkpoint_every: int = 200
    keep: int = 2
    max_failures: int = 1
    shuffle_seed: int = 0


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """AdamW's state as safetensors (tensors per parameter index) + its scalars in the metadata."""
    sd = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.contiguous() for i, s in sd["state"].items() for k, v in s.items()
               if isinstance(v, torch.Tensor)}
    meta = {"param_groups": json.dumps(sd["param_groups"]),
            "scalars": json.dumps({f"{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()
                                   if not isinstance(v, torch.Tensor)})}
    save_file(tensors, str(path), metadata=meta)


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    state: dict[int, dict[str, Any]] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        for name in f.keys():
            i, k = name.split(".", 1)
            state.setdefault(int(i), {})[k] = f.get_tensor(name)
    for name, v in json.loads(meta["scalars"]).items():
        i, k = name.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})


def _save_checkpoint(directory: Path, controlnet: Any, optimizer: torch.optim.Optimizer, step: int,
                     bad: dict[str, int]) -> None:
    controlnet.save_pretrained(directory / CONTROLNET_DIR, safe_serialization=True)
    save_optimizer(optimizer, directory / OPTIMIZER_FILE)
    (directory / STATE_FILE).write_text(json.dumps({"step": step, "bad": bad}))


def _resume(controlnet: Any, optimizer: torch.optim.Optimizer) -> tuple[int, dict[str, int]]:
    """Step and bad-row counts of Ray Train's latest checkpoint, weights and optimizer loaded; (0, {})."""
    import ray.train  # noqa: PLC0415 -- Ray only on the cluster path

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, {}
    with checkpoint.as_directory() as d:
        d = Path(d)
        weights = sorted((d / CONTROLNET_DIR).glob("*.safetensors"))
        if not weights or not (d / STATE_FILE).exists():
            raise FileNotFoundError(f"{checkpoint.path} is not a ControlNet checkpoint of this job "
                                    f"(no {CONTROLNET_DIR}/*.safetensors or {STATE_FILE}); use a new run_name")
        state_dict = {}
        for w in weights:
            state_dict.update(load_file(str(w)))
        controlnet.load_state_dict(state_dict)
        load_optimizer(optimizer, d / OPTIMIZER_FILE)
        state = json.loads((d / STATE_FILE).read_text())
    return int(state["step"]), dict(state.get("bad", {}))


def controlnet_train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: ``config`` holds ``train`` (ControlNetConfig fields), ``spec`` and MLflow ids."""
    import ray.train  # noqa: PLC0415 -- Ray only on the cluster path
    import ray.train.torch  # noqa: PLC0415 -- Ray only on the cluster path


    cfg = ControlNetConfig(**{**config["train"], "embedding_channels": tuple(config["train"]["embedding_channels"])})
    spec = RayControlNetSpec(**config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if spec.gpus_per_worker > 0 else torch.device("cpu")
    torch.manual_seed(cfg.seed)  # the same initial ControlNet on every rank (DDP also broadcasts it)
    teacher = load_teacher(spec.teacher, device=device)
    base = build_controlnet(teacher, cfg).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(base.parameters(), lr=cfg.lr, weight_decay=0.0)
    step, bad_before = _resume(base, optimizer)
    resumed_from = step
    if step and rank == 0:
        print(f"[wadi] ControlNet run {spec.run_name}: resumed from the checkpoint of step {step}", flush=True)
    model = ray.train.torch.prepare_model(base, move_to_device=device.type == "cuda")
    weights = snr_weight(teacher, cfg.min_snr_gamma)
    null = teacher.null_cond(1).embeds
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * rank + step)
    per_worker = max(1, cfg.batch_size // world)
    bad = {r: 0 for r in CONTROL_BAD_REASONS}
    metrics: dict[str, float] = {}
    tracking = contextlib.nullcontext(None)
    if rank == 0 and config.get("mlflow_run_id"):
        tracking = start_run(config["experiment"], tracking_uri=config["tracking_uri"], run_id=config["mlflow_run_id"])

    def batches():
        shard = ray.train.get_dataset_shard("train")
        while True:  # the lake is read again until the steps are done
            got = False
            for b in shard.iter_batches(batch_size=per_worker, batch_format="numpy", drop_last=True):
                images, masks, captions, dropped = decode_rows(b)
                for k, v in dropped.items():
                    bad[k] += v
                if len(captions):
                    got = True
                    yield images, masks, captions
            if not got:
                return  # an empty (or all-bad) share: this rank stops, and with it every rank

    stream = batches()
    started = time.time()
    with tracking as tracker, tqdm(total=cfg.steps, initial=step, desc=f"controlnet rank {rank}",
                                   disable=rank != 0, mininterval=5) as bar:
        while step < cfg.steps:
            # Clocks differ between ranks: one decision for all, so none waits alone in an all-reduce.
            if cfg.max_minutes and any_rank_true(time.time() - started > 60 * cfg.max_minutes, device):
                break
            item = next(stream, None)
            if not all_ranks_true(item is not None, device):
                break
            images, masks, captions = item
            latents = encode_renders(teacher, images)
            embeds = drop_captions(teacher.encode_prompts(captions).embeds, null, cfg.caption_dropout, gen)
            control = control_tensor(masks, base, teacher)
            metrics = controlnet_step(teacher, model, optimizer, latents, control, Cond(embeds), weights, gen,
                                      cfg.grad_clip, cfg.one_step_fraction, cfg.one_step_weight)
            step += 1
            bar.update(1)
            if tracker is not None and (step % 25 == 0 or step == resumed_from + 1 or step == cfg.steps):
                tracker.log_metrics({f"controlnet/{k}": v for k, v in metrics.items()}, step=step)
            if step % spec.checkpoint_every == 0 and step < cfg.steps:
                _report(base, optimizer, step, metrics, bad, bad_before, rank, device, resumed_from)
        _report(base, optimizer, step, metrics, bad, bad_before, rank, device, resumed_from, final=True,
                train_seconds=time.time() - started)


def _report(base: Any, optimizer: torch.optim.Optimizer, step: int, metrics: dict[str, float],
            bad: dict[str, int], bad_before: dict[str, int], rank: int, device: torch.device, resumed_from: int,
            final: bool = False, train_seconds: float = 0.0) -> None:
    """Every rank reports (Ray Train's rule); rank 0 attaches the checkpoint, with bad-row counts
    summed over ranks (a collective) and added to those of earlier attempts."""
    import ray.train  # noqa: PLC0415 -- Ray only on the cluster path

    total = dict(zip(CONTROL_BAD_REASONS, sum_over_ranks([bad[r] for r in CONTROL_BAD_REASONS], device)))
    total = {k: v + int(bad_before.get(k, 0)) for k, v in total.items()}
    out = {"step": step, "resumed_from": resumed_from,
           **{f"controlnet/{k}": float(v) for k, v in metrics.items() if math.isfinite(v)},
           **{f"data/bad_{k}": v for k, v in total.items()}}
    if final:
        out["train_seconds"] = train_seconds
    if rank != 0:
        ray.train.report(out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        _save_checkpoint(Path(tmp), base, optimizer, step, total)
        ray.train.report(out, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def run_controlnet_training(cfg: Any, spec: RayControlNetSpec, ray_address: str | None = None,
                            mlflow_run_id: str | None = None, tracking_uri: str | None = None,
                            experiment: str = "wadi-downstream") -> tuple[Any, dict[str, float]]:
    """Train ``cfg`` (``ControlNetConfig``) on ``spec.workers`` Ray Train workers; returns the trained
    ControlNet (loaded from the final checkpoint) and the final metrics (step, bad-row counts,
    train_seconds). Joins Ray at ``ray_address`` / ``RAY_ADDRESS``, else starts a local one."""
    import ray  # noqa: PLC0415 -- Ray only on the cluster path
    from ray.train import (CheckpointConfig, FailureConfig, RunConfig,  # noqa: PLC0415 -- cluster path only
                           ScalingConfig)
    from ray.train.torch import TorchTrainer  # noqa: PLC0415 -- Ray only on the cluster path


    def absolute(path: str) -> str:  # Ray's storage and its workers need no working directory
        return path if storage.is_remote(path) or path == "embedded" else str(Path(path).expanduser().resolve())

    spec = dataclasses.replace(spec, lake=absolute(spec.lake), storage_path=absolute(spec.storage_path),
                               teacher=absolute(spec.teacher))
    started_here = init_ray(ray_address, num_cpus=local_cpus())
    joined_remote = not started_here and resolve_ray_address(ray_address) != "local"
    check_worker_cpus(spec.workers, spec.cpus_per_worker, ray.cluster_resources().get("CPU", 0.0),
                      strict=not joined_remote, keys=("workers", "cpus_per_worker"))
    resources = {"CPU": spec.cpus_per_worker, **({"GPU": spec.gpus_per_worker} if spec.gpus_per_worker else {})}
    storage_path, storage_fs = run_storage(spec.storage_path)
    trainer = TorchTrainer(
        controlnet_train_loop,
        train_loop_config={"train": dataclasses.asdict(cfg), "spec": dataclasses.asdict(spec),
                           "mlflow_run_id": mlflow_run_id, "tracking_uri": tracking_uri, "experiment": experiment},
        scaling_config=ScalingConfig(num_workers=spec.workers, use_gpu=spec.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=spec.run_name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=spec.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.keep)),
        datasets={"train": control_dataset(spec.lake, spec.shuffle_seed)},
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(redact(f"ControlNet run {spec.run_name} failed: {result.error}"))
    if result.checkpoint is None:
        raise RuntimeError(f"ControlNet run {spec.run_name} ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        controlnet = load_controlnet(Path(d) / CONTROLNET_DIR)
    return controlnet, dict(result.metrics or {})
