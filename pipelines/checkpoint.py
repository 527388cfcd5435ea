"""Training-state checkpoints of a Ray Train run: both DeepSpeed engines, progress, per-rank RNG.

Layout of one checkpoint directory (merged by Ray from every rank's local copy):

    student/  fake/              engine.save_checkpoint(tag="state"): every rank writes its
                                 ZeRO shard, rank 0 the adapter weights
    rng_rank<r>.safetensors      torch global RNG + the VSD noise generator of rank r
    progress.json                step, epoch, batches consumed in that epoch, counters (rank 0)

DeepSpeed's own files use torch.save; they are training state this job wrote, not user input.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

__all__ = ["Progress", "save_training_state", "load_training_state", "TAG", "mark_complete",
           "latest_complete_checkpoint", "checkpoint_step", "prune_untracked_checkpoints"]

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

    @classmethod
    def from_json(cls, text: str) -> "Progress":
        data = json.loads(text)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


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
                        rank: int) -> Progress:
    """Inverse of :func:`save_training_state`; raises if an engine's state is missing."""
    src = Path(directory)
    if not (src / _PROGRESS).exists():
        raise FileNotFoundError(f"{src} has no {_PROGRESS}: not a checkpoint written by pipelines.checkpoint")
    progress = Progress.from_json((src / _PROGRESS).read_text())
    for role, engine in engines.items():
        if not (src / role / TAG).is_dir():
            raise RuntimeError(f"checkpoint {src} holds no DeepSpeed state for {role!r} (step {progress.step})")
        # load_checkpoint on a missing path only warns and returns (None, None): check it too.
        path, _ = engine.load_checkpoint(str(src / role), tag=TAG, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
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
