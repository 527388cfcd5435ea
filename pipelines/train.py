"""The Ray Train worker loop: prompts -> text encoder -> ``vsd_step`` on two DeepSpeed engines.

Every worker loads the teacher, adds the "student" and "fake" adapters (one frozen shared base)
and wraps each adapter's modules in its own DeepSpeed engine. Rank 0 logs to MLflow; every rank
writes its share of each checkpoint and reports the same checkpoint directory name, which Ray
merges into one directory in ``RunConfig.storage_path``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from wadi_core.config import from_dict
from wadi_core.vsd.ema import AdapterEMA

from pipelines.checkpoint import (Progress, file_manifest, load_first_good_checkpoint, load_training_state,
                                  mark_complete, merge_manifests, model_fingerprint, save_training_state,
                                  upload_checkpoint)
# Flag / counter all-reduces on the training device (NCCL takes CUDA tensors only).
from pipelines.collectives import all_ranks_true as _all_ranks_true
from pipelines.collectives import any_rank_true as _any_rank_true
from pipelines.collectives import sum_over_ranks as _sum_over_ranks
from pipelines.config import DistillConfig
from pipelines.data import PromptStream
from pipelines.tarshards import BAD_REASONS
from pipelines.text_encoding import batch_cond, remember_conds

__all__ = ["train_loop", "dataset_name"]

ROLES = ("student", "fake")
EMA_FILE = "student_ema.safetensors"  # the student EMA's state in a checkpoint (rank 0 writes it)


def dataset_name(epoch: int) -> str:
    """Each epoch is its own dataset (own file order, seed + epoch), so resume knows the order."""
    return f"prompts_epoch_{epoch}"


#: Steps between polls of Ray Train's drain notice (``ray.train.get_preemption_info``, a barrier
#: through Ray's synchronization actor: ~ms; Ray's own watcher polls the GCS every 5 s).
PREEMPTION_POLL_EVERY = int(os.environ.get("WADI_PREEMPTION_POLL_EVERY", "1"))


@contextlib.contextmanager
def _full_params(engines: dict[str, Any], zero_stage: int) -> Iterator[None]:
    """Under ZeRO-3 gather the adapters' parameters on every rank (a collective); else a no-op."""
    if zero_stage != 3:
        yield
        return
    import deepspeed

    params = [p for e in engines.values() for p in e.module.parameters()]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def _maybe_nan(cfg: DistillConfig, rank: int, step: int, cond: Any) -> Any:
    """Fault injection for tests: NaN text embeddings on ``debug.nan_rank`` at ``debug.nan_at_step``."""
    d = cfg.debug
    if d.nan_at_step != step or d.nan_rank not in (-1, rank):
        return cond
    return type(cond)(cond.embeds * float("nan"), cond.mask)


def _maybe_fail(cfg: DistillConfig, rank: int, next_step: int) -> None:
    """Fault injection for tests: ``debug.fail_rank`` dies once at ``debug.fail_at_step``."""
    d = cfg.debug
    if d.fail_rank != rank or d.fail_at_step != next_step or not d.fail_marker:
        return
    marker = Path(d.fail_marker)
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"rank {rank} killed itself before step {next_step}\n")
    os._exit(1)


class _Run:
    """State of one worker: models, engines, data position, tracker."""

    def __init__(self, cfg: DistillConfig, loop_config: dict[str, Any]):
        import ray.train

        from wadi_core.models import load_teacher
        from wadi_core.vsd import WaDiDistiller

        from pipelines.engines import DeepSpeedUpdater, build_engine, init_distributed

        self.cfg = cfg
        self.loop_config = loop_config
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        init_distributed()
        use_gpu = cfg.train.gpus_per_worker > 0 and torch.cuda.is_available()
        if use_gpu:
            import ray.train.torch

            self.device = ray.train.torch.get_device()  # respects Ray's CUDA_VISIBLE_DEVICES
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        # Same seed on every rank while the adapters are initialised, so all ranks start equal.
        torch.manual_seed(cfg.train.seed)
        # data.text_encoding=actors: no text encoder here; embeddings arrive with the prompts.
        self.teacher = load_teacher(cfg.teacher, device=self.device, text_encoder=cfg.data.text_encoding == "trainer")
        if loop_config.get("text_conds"):  # the empty and sample prompts, encoded once by an actor
            remember_conds(self.teacher, loop_config["text_conds"])
        encoder = self.teacher.text_encoder
        self.text_encoder_params = sum(p.numel() for p in encoder.parameters()) if encoder is not None else 0
        self.distiller = WaDiDistiller(self.teacher, cfg.vsd)
        # Before ZeRO partitions anything: what a checkpoint of this run must have been made for.
        self.fingerprint = model_fingerprint(str(cfg.teacher), self.teacher.denoiser,
                                             {r: self.distiller.modules(r) for r in ROLES})
        torch.manual_seed(cfg.train.seed + 7919 * self.rank)
        lrs = {"student": cfg.vsd.gen_lr, "fake": cfg.vsd.fake_lr}
        self.engines = {r: build_engine(self.distiller.modules(r), lrs[r], cfg.train, cfg.vsd) for r in ROLES}
        self.updaters = {r: DeepSpeedUpdater(e) for r, e in self.engines.items()}
        # Under ZeRO <= 2 every rank holds the full (identical) student: each keeps the same average.
        self.ema = (AdapterEMA(self.distiller.parameters("student"), cfg.vsd.student_ema)
                    if cfg.vsd.student_ema else None)
        # Different noise per rank; restored from the checkpoint on resume.
        self.generator = torch.Generator(self.device).manual_seed(cfg.train.seed * 1_000_003 + self.rank)
        self.progress = Progress(mlflow_run_id=loop_config.get("mlflow_run_id"), fingerprint=self.fingerprint)
        self.resumed_from = 0
        self.last_saved_step = -1
        self.checkpoint_seconds = 0.0  # the last checkpoint's save + upload time
        self.notice_step: int | None = None  # step at which a drain (preemption) notice was seen
        self.saved_before_deadline = False
        # Newest checkpoint first; one that fails verification (manifest, pickle allow-list) on any
        # rank is skipped on all. Load everything now: num_to_keep may delete the directory later.
        progress, rejected = load_first_good_checkpoint(
            self._resume_candidates(),
            self._load_state,
            agree=lambda ok: _all_ranks_true(ok, self.device))
        self.corrupt_checkpoints_skipped = len(rejected)
        if progress is not None:
            self.progress = progress
            self.progress.fingerprint = self.fingerprint
            self.resumed_from = self.last_saved_step = self.progress.step
        prompts = list(loop_config.get("sample_prompts") or [])
        self.sample_prompts = prompts[: cfg.tracking.num_sample_prompts]
        self.sample_z = torch.randn(len(self.sample_prompts), *self.teacher.latent_shape,
                                    generator=torch.Generator().manual_seed(cfg.train.seed + 1))

    def _load_state(self, directory: str) -> Progress:
        """DeepSpeed engines, RNG and data position (pipelines.checkpoint), then the student EMA."""
        progress = load_training_state(directory, self.engines, self.generator, self.rank, self.fingerprint,
                                       verify=False)
        if self.ema is not None:
            ema_file = Path(directory) / EMA_FILE
            if ema_file.exists():
                from safetensors.torch import load_file

                self.ema.load_state_dict(load_file(str(ema_file)))
            else:
                warnings.warn(f"{directory} has no {EMA_FILE}: the student EMA restarts from the current weights")
        return progress

    def averaged(self) -> Any:
        """The student EMA swapped in (samples, checkpoint adapter file, export), else a no-op."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def _resume_candidates(self) -> list[Any]:
        """Ray's checkpoint for this attempt and every complete one in storage, newest first."""
        import ray.train

        from pipelines.checkpoint import checkpoint_step, complete_checkpoints

        found = complete_checkpoints(self.cfg.train.storage_path, self.cfg.train.run_name)
        ray_checkpoint = ray.train.get_checkpoint()
        names = {c.path.rstrip("/").rsplit("/", 1)[-1] for c in found}
        if ray_checkpoint is not None and ray_checkpoint.path.rstrip("/").rsplit("/", 1)[-1] not in names:
            found.append(ray_checkpoint)
        return sorted(found, key=lambda c: checkpoint_step(c.path), reverse=True)

    # -- logging --------------------------------------------------------------------------------
    def samples(self, tracker: Any, step: int) -> None:
        if not self.sample_prompts:
            return
        if self.rank != 0 and self.cfg.train.zero_stage != 3:
            return
        from wadi_core.images import save_image_grid

        with _full_params(self.engines, self.cfg.train.zero_stage), self.averaged():
            images = self.distiller.sample(self.sample_prompts, z=self.sample_z)
        if self.rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                path = save_image_grid([images], Path(tmp) / f"step_{step:06d}.png", scale=None)
                from PIL import Image

                with Image.open(path) as grid:  # MLflow 3's step-aware images: one slider per key
                    tracker.log_image(grid.copy(), key="samples", step=step)

    def bad_counts(self, stream: PromptStream) -> dict[str, int]:
        """Bad rows over all ranks and all epochs so far (a collective)."""
        local = [self.progress.bad_before_epoch.get(r, 0) * (self.rank == 0) + stream.bad[r] for r in BAD_REASONS]
        return dict(zip(BAD_REASONS, _sum_over_ranks(local, self.device)))

    # -- preemption -----------------------------------------------------------------------------
    def preemption_checkpoint_due(self, step_seconds: float) -> bool:
        """All ranks, every ``PREEMPTION_POLL_EVERY`` steps: True when a checkpoint must be written
        now because a node of this run is being drained (spot reclaim, autoscaler v2, KubeRay, ``ray
        drain-node --reason DRAIN_NODE_REASON_PREEMPTION``): once at the notice, and once more just
        before the reclaim deadline, so a reclaim loses only the steps after that. Training goes on
        in between; at the deadline Ray Train restarts the group, which resumes from the newest."""
        import ray.train

        info = ray.train.get_preemption_info()  # a collective: the same answer on every rank
        if info is None:
            return False
        if self.notice_step is None:
            self.notice_step = self.progress.step
            print(f"[wadi] rank {self.rank}: drain notice for nodes {info.preempted_node_ids} (ranks "
                  f"{info.preempted_ranks}, deadline_ms {info.deadline_ms}) at step {self.notice_step}: "
                  "checkpointing now", flush=True)
            return True
        if self.saved_before_deadline or not info.deadline_ms:
            return False
        left_s = info.deadline_ms / 1000 - time.time()
        due = left_s < 2 * (self.checkpoint_seconds + step_seconds) + 1.0
        if _any_rank_true(due, self.device):
            self.saved_before_deadline = True
            return True
        return False

    # -- checkpoints ----------------------------------------------------------------------------
    def checkpoint(self, metrics: dict[str, float], stream: PromptStream) -> None:
        """Save and report a checkpoint (all ranks). A step already saved is reported without
        one: re-reporting the same directory name would let num_to_keep delete it."""
        import ray.train

        started = time.perf_counter()
        step = self.progress.step
        report = {**metrics, **{f"data/bad_{k}": float(v) for k, v in self.bad_counts(stream).items()},
                  "resumed_from_step": float(self.resumed_from), "step": step, "epoch": self.progress.epoch,
                  "preemption/notice_step": float(-1 if self.notice_step is None else self.notice_step),
                  "vsd/nonfinite_steps": float(self.progress.nonfinite_steps),
                  "resume/corrupt_checkpoints_skipped": float(self.corrupt_checkpoints_skipped),
                  "worker/text_encoder_params": float(self.text_encoder_params)}
        if step == self.last_saved_step:
            ray.train.report(report)
            return
        self.last_saved_step = step
        name = f"checkpoint_{step:08d}"
        with tempfile.TemporaryDirectory(prefix="wadi-ckpt-") as tmp:
            save_training_state(tmp, self.engines, self.generator, self.progress, self.rank)
            self.save_student_adapter(Path(tmp) / "adapters" / "student.safetensors")
            if self.ema is not None and self.rank == 0:  # the average's own state, for resume
                from safetensors.torch import save_file

                save_file(self.ema.state_dict(), str(Path(tmp) / EMA_FILE))
            # What every rank wrote, hashed before upload: COMPLETE holds it, resume checks it.
            manifests: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(manifests, file_manifest(tmp))
            # Our upload: every file retried on transient storage faults (pipelines.checkpoint).
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name,
                             checkpoint_upload_fn=lambda c, n: upload_checkpoint(
                                 c.path, self.cfg.train.storage_path, self.cfg.train.run_name, n))
        # report() uploads synchronously; once every rank is past it the directory is whole.
        torch.distributed.barrier()
        if self.rank == 0:
            mark_complete(self.cfg.train.storage_path, self.cfg.train.run_name, name, merge_manifests(manifests))
        self.checkpoint_seconds = time.perf_counter() - started

    def save_student_adapter(self, path: Path) -> None:
        """Rank 0 adds the student adapter as a plain safetensors file, so a checkpoint can be
        evaluated (``jobs/evaluate.py schedule``) without DeepSpeed. Collective under ZeRO-3."""
        from wadi_core.adapters import adapter_state_dict
        from wadi_core.adapters import save_adapter_file

        with _full_params(self.engines, self.cfg.train.zero_stage):
            if self.rank == 0:
                with self.averaged():  # what an evaluation of this checkpoint should see
                    save_adapter_file(path, adapter_state_dict(self.distiller.denoiser, "student"),
                                      self.cfg.vsd.student, self.distiller.teacher.family, "student",
                                      student_alphabar=self.distiller.student_alphabar)

    def export(self) -> str | None:
        """Rank 0 writes the merged one-step pipeline (+ adapters) and uploads it to export_uri."""
        from wadi_core import storage
        from wadi_core.export import export_one_step_pipeline

        uri = self.loop_config["export_uri"]
        with _full_params(self.engines, self.cfg.train.zero_stage):
            if self.rank != 0:
                return None
            with tempfile.TemporaryDirectory(prefix="wadi-export-") as tmp, self.averaged():
                out = export_one_step_pipeline(self.distiller, Path(tmp) / "export")
                storage.upload_dir(out, uri)
        return uri


def _epochs(run: _Run) -> Iterator[tuple[int, Any, int]]:
    """(epoch, dataset shard, batches to skip) from the resumed position on."""
    import ray.train

    p = run.progress
    for epoch in range(p.epoch, run.loop_config["num_epochs"]):
        skip = p.batches_in_epoch if epoch == p.epoch else 0
        yield epoch, ray.train.get_dataset_shard(dataset_name(epoch)), skip


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point (``train_loop_config``: flat config, MLflow ids, export uri, prompts)."""
    from tqdm.auto import tqdm

    from wadi_core.vsd import vsd_step
    from wadi_core.vsd import NonFiniteGuard

    from pipelines.tracking import start_run

    cfg = from_dict(DistillConfig, loop_config["config"])
    run = _Run(cfg, loop_config)
    p, t = run.progress, cfg.train
    max_steps = cfg.data.max_steps
    tracking = contextlib.nullcontext(None)
    if run.rank == 0 and loop_config.get("mlflow_run_id"):
        # System metrics from rank 0's node (a GPU worker; the driver's head node has none).
        tracking = start_run(cfg.tracking.experiment, tracking_uri=loop_config["tracking_uri"],
                             run_id=loop_config["mlflow_run_id"], log_system_metrics=True)
    with tracking as tracker:
        tracker = tracker or _NullTracker()
        if run.resumed_from:
            tracker.log_metrics({"resume/from_step": run.resumed_from}, step=run.resumed_from)
        if run.corrupt_checkpoints_skipped:
            tracker.log_metrics({"resume/corrupt_checkpoints_skipped": run.corrupt_checkpoints_skipped},
                                step=run.resumed_from)
        nonfinite = NonFiniteGuard(t.max_nonfinite_in_a_row, total=p.nonfinite_steps)
        metrics: dict[str, float] = {}
        bar = tqdm(total=max_steps or loop_config.get("total_steps"), initial=p.step, desc=f"vsd rank {run.rank}",
                   disable=run.rank != 0, mininterval=5)
        stream = PromptStream(t.per_worker_batch)
        done = bool(max_steps) and p.step >= max_steps
        for epoch, shard, skip in _epochs(run):
            if done:
                break
            stream = PromptStream(t.per_worker_batch)
            batches = stream.batches(shard, skip=skip)
            t_last = time.perf_counter()
            while True:
                batch = next(batches, None)
                if not _all_ranks_true(batch is not None, run.device):
                    break
                _maybe_fail(cfg, run.rank, p.step + 1)
                cond = batch_cond(run.teacher, batch)  # here or streamed: pipelines/text_encoding.py
                cond = _maybe_nan(cfg, run.rank, p.step + 1, cond)
                metrics = vsd_step(run.distiller, cond, run.updaters["student"], run.updaters["fake"], run.generator)
                p.step += 1
                # A non-finite step was skipped on every rank (Updater.step): count it, stop after N in a row.
                nonfinite.update(metrics, p.step)
                if run.ema is not None and not metrics.get("skipped_nonfinite"):
                    run.ema.update()
                p.nonfinite_steps = nonfinite.total
                p.batches_in_epoch += 1
                p.prompts_seen += t.global_batch
                now = time.perf_counter()
                step_s, t_last = now - t_last, now
                bar.update(1)
                if p.step % t.log_every == 0:
                    bad = run.bad_counts(stream)
                    tracker.log_metrics({
                        **{f"vsd/{k}": v for k, v in metrics.items()}, "vsd/nonfinite_steps": p.nonfinite_steps,
                        "perf/step_seconds": step_s, "perf/prompts_per_second": t.global_batch / step_s,
                        "progress/epoch": epoch, "progress/prompts_seen": p.prompts_seen,
                        **{f"data/bad_{k}": v for k, v in bad.items()},
                    }, step=p.step)
                if cfg.tracking.sample_every and p.step % cfg.tracking.sample_every == 0:
                    run.samples(tracker, p.step)
                done = bool(max_steps) and p.step >= max_steps
                if t.checkpoint_every and p.step % t.checkpoint_every == 0 and not done:
                    run.checkpoint(metrics, stream)
                if (PREEMPTION_POLL_EVERY and p.step % PREEMPTION_POLL_EVERY == 0 and not done
                        and run.preemption_checkpoint_due(step_s)):
                    run.checkpoint(metrics, stream)  # a step already saved is not saved twice
                    tracker.log_metrics({"preemption/checkpoint_step": p.step}, step=p.step)
                if done:
                    break
            if not done:
                for _ in batches:  # finish the epoch's stream so every bad row is counted
                    pass
                bad = run.bad_counts(stream)
                p.bad_before_epoch = bad
                p.epoch, p.batches_in_epoch = epoch + 1, 0
                tracker.log_metrics({f"data/bad_{k}": v for k, v in bad.items()}, step=p.step)
                stream = PromptStream(t.per_worker_batch)
        bar.close()
        bad = run.bad_counts(stream)
        tracker.log_metrics({f"data/bad_{k}": v for k, v in bad.items()}, step=p.step)
        if not (cfg.tracking.sample_every and p.step % cfg.tracking.sample_every == 0):
            run.samples(tracker, p.step)  # the final grid (unless this step just made one)
        export_uri = run.export()
        if export_uri:
            tracker.set_tags({"wadi.export_uri": export_uri})
        run.checkpoint(metrics, stream)


class _NullTracker:
    """Stands in for the MLflow tracker on ranks other than 0."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None
