"""One rank's checkpoints of a distillation run: resume from the newest that verifies; save, upload
and mark complete (the file-level functions are in pipelines/train/checkpoint.py)."""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from wadi_core.adapters import adapter_state_dict, save_adapter_file
from wadi_core.vsd import WaDiDistiller
from wadi_core.vsd.bookkeeping import ema_applied
from wadi_core.vsd.ema import AdapterEMA

from pipelines.config.job import DistillConfig
from pipelines.runtime.collectives import all_ranks_true
from pipelines.train.checkpoint import (TamperedCheckpoint, TrainState, checkpoint_dir_name, checkpoint_step,
                                        complete_checkpoints, file_manifest, load_first_good_checkpoint,
                                        load_training_state, mark_complete, merge_manifests, save_training_state,
                                        upload_checkpoint)
from pipelines.train.engines import full_params

__all__ = ["CheckpointManager", "EMA_FILE"]

EMA_FILE = "student_ema.safetensors"  # the student EMA's state in a checkpoint (rank 0 writes it)


class CheckpointManager:
    """Checkpoints of one run on one rank: :meth:`resume` loads the newest complete one that verifies
    on every rank, :meth:`save` writes, uploads and reports one (all ranks) and rank 0 marks it complete."""

    def __init__(self, cfg: DistillConfig, distiller: WaDiDistiller, engines: Mapping[str, Any],
                 ema: AdapterEMA | None, fingerprint: dict[str, str],
                 rank: int, world: int, device: torch.device | str) -> None:
        self.cfg, self.distiller, self.engines, self.ema = cfg, distiller, engines, ema
        self.fingerprint, self.rank, self.world, self.device = fingerprint, rank, world, device
        self.resumed_from = 0
        self.last_saved_step = -1
        self.seconds = 0.0  # the last checkpoint's save + upload time
        self.corrupt_skipped = self.tampered_skipped = 0

    # -- resume ---------------------------------------------------------------------------------
    def resume(self, fresh: TrainState) -> TrainState:
        """Newest checkpoint first; one that fails verification (manifest, pickle allow-list) on
        any rank is skipped on all. Everything is loaded now: num_to_keep may delete it later.
        Returns ``fresh`` when the run has no checkpoint yet."""
        state, rejected = load_first_good_checkpoint(self.resume_candidates(), self.load,
                                                     agree=lambda ok: all_ranks_true(ok, self.device))
        self.tampered_skipped = sum(isinstance(r, TamperedCheckpoint) for r in rejected)
        self.corrupt_skipped = len(rejected) - self.tampered_skipped
        if state is None:
            return fresh
        state.fingerprint = self.fingerprint
        self.resumed_from = self.last_saved_step = state.step
        return state

    def resume_candidates(self) -> list[Any]:
        """Ray's checkpoint for this attempt and every complete one in storage, newest first."""
        import ray.train  # noqa: PLC0415 -- Ray only on the cluster path

        found = complete_checkpoints(self.cfg.train.storage_path, self.cfg.train.run_name)
        ray_checkpoint = ray.train.get_checkpoint()
        names = {c.path.rstrip("/").rsplit("/", 1)[-1] for c in found}
        if ray_checkpoint is not None and ray_checkpoint.path.rstrip("/").rsplit("/", 1)[-1] not in names:
            found.append(ray_checkpoint)
        return sorted(found, key=lambda c: checkpoint_step(c.path), reverse=True)

    def load(self, directory: str | Path) -> TrainState:
        """DeepSpeed engines and TrainState (pipelines.train.checkpoint), then the student EMA."""
        state = load_training_state(directory, self.engines, self.rank, self.fingerprint, verify=False)
        if self.ema is not None:
            ema_file = Path(directory) / EMA_FILE
            if ema_file.exists():
                self.ema.load_state_dict(load_file(str(ema_file)))
            else:
                warnings.warn(f"{directory} has no {EMA_FILE}: the student EMA restarts from the current weights")
        return state

    # -- save -----------------------------------------------------------------------------------
    def save(self, state: TrainState, report: dict[str, Any]) -> None:
        """Save ``state``'s step and report it with ``report`` (all ranks). A step already saved is
        reported without one: re-reporting the same directory name would let num_to_keep delete it."""
        import ray.train  # noqa: PLC0415 -- Ray only on the cluster path

        started = time.perf_counter()
        step = state.step
        if step in (self.last_saved_step, 0):  # nothing new to keep (step 0: nothing trained)
            ray.train.report(report)
            return
        self.last_saved_step = step
        name = checkpoint_dir_name(step)
        storage_path, run_name = self.cfg.train.storage_path, self.cfg.train.run_name
        with tempfile.TemporaryDirectory(prefix="wadi-ckpt-") as tmp:
            # An elastic run writes the world-size-independent full state (pipelines/train/portable_state.py).
            save_training_state(tmp, self.engines, state, self.rank, portable=self.cfg.train.elastic)
            self.save_student_adapter(Path(tmp) / "adapters" / "student.safetensors")
            if self.ema is not None and self.rank == 0:  # the average's own state, for resume
                save_file(self.ema.state_dict(), str(Path(tmp) / EMA_FILE))
            # What every rank wrote, hashed before upload: COMPLETE holds it, resume checks it.
            manifests: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(manifests, file_manifest(tmp))
            # Our upload: every file retried on transient storage faults (pipelines.train.checkpoint).
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name,
                             checkpoint_upload_fn=lambda c, n: upload_checkpoint(c.path, storage_path, run_name, n))
        # report() uploads synchronously; once every rank is past it the directory is whole.
        torch.distributed.barrier()
        if self.rank == 0:
            mark_complete(storage_path, run_name, name, merge_manifests(manifests))
        self.seconds = time.perf_counter() - started

    def save_student_adapter(self, path: Path) -> None:
        """Rank 0 adds the student adapter as a plain safetensors file, so a checkpoint can be
        evaluated (``jobs/evaluate.py schedule``) without DeepSpeed. Collective under ZeRO-3."""
        with full_params(self.engines, self.cfg.train.zero_stage):
            if self.rank == 0:
                with ema_applied(self.ema):  # what an evaluation of this checkpoint should see
                    save_adapter_file(path, adapter_state_dict(self.distiller.denoiser, "student"),
                                      self.cfg.vsd.student, self.distiller.teacher.family, "student",
                                      student_alphabar=self.distiller.student_alphabar)
