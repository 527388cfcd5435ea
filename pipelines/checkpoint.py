"""Training-state checkpoints of a Ray Train run: both DeepSpeed engines, progress, per-rank RNG.

Layout of one checkpoint directory (merged by Ray from every rank's local copy):

    student/  fake/              engine.save_checkpoint(tag="state"): every rank writes its
                                 ZeRO shard, rank 0 the adapter weights
    rng_rank<r>.safetensors      torch global RNG + the VSD noise generator of rank r
    progress.json                step, epoch, batches consumed in that epoch, counters (rank 0)

DeepSpeed's own files use torch.save; they are training state this job wrote, not user input.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

__all__ = ["Progress", "model_fingerprint", "check_fingerprint", "IncompatibleCheckpoint", "save_training_state",
           "load_training_state", "TAG", "mark_complete", "latest_complete_checkpoint", "checkpoint_step",
           "prune_untracked_checkpoints"]

TAG = "state"
_PROGRESS = "progress.json"
COMPLETE = "COMPLETE"
_NAME = re.compile(r"^checkpoint_(\d+)$")


@dataclass
class Progress:
    """Where the run is: global step and data position (epoch + per-worker batches consumed)."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    prompts_seen: int = 0
    bad_before_epoch: dict[str, int] = field(default_factory=dict)  # bad rows of finished epochs
    mlflow_run_id: str | None = None
    fingerprint: dict[str, str] = field(default_factory=dict)  # what the state was trained for

    @classmethod
    def from_json(cls, text: str) -> "Progress":
        data = json.loads(text)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class IncompatibleCheckpoint(RuntimeError):
    """A checkpoint written for another teacher or other adapters than this run's."""


_RESTART_ADVICE = ("(the teacher or the adapter config changed since): give this run a new train.run_name "
                   "(or train.storage_path), or delete the old run's folder to start over.")


def _digest(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


def model_fingerprint(teacher_source: str, denoiser: torch.nn.Module, roles: Mapping[str, torch.nn.Module]) -> dict[str, str]:
    """What a training state belongs to: the teacher (its source, its parameter shapes and the
    bytes of its first weight tensor, which a retrained teacher changes) and, per role, the names
    and shapes of the trainable adapter tensors. Cheap (no pass over all the weights)."""
    params = list(denoiser.named_parameters())
    first = params[0][1].detach().to("cpu", torch.float32).contiguous() if params else torch.zeros(0)
    teacher = _digest([teacher_source] + [f"{n}:{tuple(p.shape)}" for n, p in params]
                      + [hashlib.sha256(first.numpy().tobytes()).hexdigest()])
    out = {"teacher": teacher}
    for role, module in roles.items():
        out[role] = _digest([f"{n}:{tuple(p.shape)}" for n, p in module.named_parameters()])
    return out


def check_fingerprint(saved: Mapping[str, str], current: Mapping[str, str], where: str) -> None:
    """Raise :class:`IncompatibleCheckpoint` when a checkpoint belongs to another model."""
    if not saved:  # written before fingerprints existed: nothing to compare
        return
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if diff:
        raise IncompatibleCheckpoint(
            f"checkpoint {where} was written for another {' / '.join(diff)} than this run's "
            f"{_RESTART_ADVICE}")


def save_training_state(directory: str | os.PathLike, engines: Mapping[str, Any], generator: torch.Generator,
                        progress: Progress, rank: int) -> None:
    """Every rank: its engine shards and RNG; rank 0 also the progress. Collective (all ranks call)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for role, engine in engines.items():
        engine.save_checkpoint(str(out / role), tag=TAG, client_state={"step": progress.step})
    save_file({"torch": torch.get_rng_state(), "generator": generator.get_state()},
              str(out / f"rng_rank{rank}.safetensors"))
    if rank == 0:
        (out / _PROGRESS).write_text(json.dumps(asdict(progress)))


def load_training_state(directory: str | os.PathLike, engines: Mapping[str, Any], generator: torch.Generator,
                        rank: int, fingerprint: Mapping[str, str] | None = None) -> Progress:
    """Inverse of :func:`save_training_state`; raises if an engine's state is missing, or
    :class:`IncompatibleCheckpoint` if ``fingerprint`` differs from the one saved with it."""
    src = Path(directory)
    if not (src / _PROGRESS).exists():
        raise FileNotFoundError(f"{src} has no {_PROGRESS}: not a checkpoint written by pipelines.checkpoint")
    progress = Progress.from_json((src / _PROGRESS).read_text())
    if fingerprint is not None:
        check_fingerprint(progress.fingerprint, fingerprint, str(src))
    for role, engine in engines.items():
        if not (src / role / TAG).is_dir():
            raise RuntimeError(f"checkpoint {src} holds no DeepSpeed state for {role!r} (step {progress.step})")
        # load_checkpoint on a missing path only warns and returns (None, None): check it too.
        try:
            path, _ = engine.load_checkpoint(str(src / role), tag=TAG, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
        except RuntimeError as e:  # a checkpoint from before fingerprints, of another model
            if "state_dict" not in str(e):
                raise
            raise IncompatibleCheckpoint(
                f"checkpoint {src} does not fit this run's {role} adapters {_RESTART_ADVICE} "
                f"DeepSpeed said: {str(e)[:300]}") from e
        if path is None:
            raise RuntimeError(f"checkpoint {src} holds no DeepSpeed state for {role!r} (step {progress.step})")
    rng_file = src / f"rng_rank{rank}.safetensors"
    if rng_file.exists():
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["torch"])
        generator.set_state(rng["generator"])
    else:
        warnings.warn(f"{rng_file.name} missing (world size changed?): rank {rank} keeps a fresh RNG")
    return progress


def checkpoint_step(path: str) -> int:
    """Step encoded in a ``checkpoint_<step>`` directory name (-1 if it is not one)."""
    m = _NAME.match(path.rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else -1


def mark_complete(storage_uri: str, run_name: str, dir_name: str) -> None:
    """Rank 0, after every rank's upload (barrier): write the ``COMPLETE`` marker in storage."""
    from pipelines.data import pyarrow_filesystem

    fs, root = pyarrow_filesystem(storage_uri)
    with fs.open_output_stream(f"{root}/{run_name}/{dir_name}/{COMPLETE}") as f:
        f.write(b"all ranks uploaded\n")


def latest_complete_checkpoint(storage_uri: str, run_name: str) -> Any | None:
    """Newest ``checkpoint_*`` of the run in storage that has its ``COMPLETE`` marker.

    Ray Train V2 restarts a failed worker group, but a checkpoint reported shortly before the
    failure may not be registered yet (``get_checkpoint()`` then returns None and the run would
    start over); the storage itself is the source of truth.
    """
    import pyarrow.fs as pafs
    import ray.train

    from pipelines.data import pyarrow_filesystem

    fs, root = pyarrow_filesystem(storage_uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(f"{root}/{run_name}", allow_not_found=True))
    except OSError:
        return None
    dirs = sorted((i.path for i in infos if i.type == pafs.FileType.Directory and checkpoint_step(i.path) >= 0),
                  key=checkpoint_step, reverse=True)
    for d in dirs:
        if fs.get_file_info(f"{d}/{COMPLETE}").type == pafs.FileType.File:
            return ray.train.Checkpoint(path=d, filesystem=fs)
    return None


def prune_untracked_checkpoints(storage_uri: str, run_name: str, tracked: list[str]) -> list[str]:
    """Driver, after the fit: delete ``checkpoint_*`` dirs Ray's manager does not track and that are
    older than its newest one (reported just before a worker died, they escape ``num_to_keep``)."""
    import pyarrow.fs as pafs

    from pipelines.data import pyarrow_filesystem

    fs, root = pyarrow_filesystem(storage_uri)
    keep = {p.rstrip("/").rsplit("/", 1)[-1] for p in tracked}
    newest = max((checkpoint_step(p) for p in tracked), default=-1)
    infos = fs.get_file_info(pafs.FileSelector(f"{root}/{run_name}", allow_not_found=True))
    removed = []
    for info in infos:
        name = info.path.rstrip("/").rsplit("/", 1)[-1]
        if info.type == pafs.FileType.Directory and name not in keep and 0 <= checkpoint_step(name) < newest:
            fs.delete_dir(info.path)
            removed.append(name)
    return removed
