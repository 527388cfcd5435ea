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
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from wadi_core import storage
from wadi_core.adapters import adapter_state_dict, save_adapter_file
from wadi_core.config import from_dict
from wadi_core.export import export_one_step_pipeline
from wadi_core.images import save_image_grid
from wadi_core.models import load_teacher
from wadi_core.vsd import NonFiniteGuard, WaDiDistiller, vsd_step
from wadi_core.vsd.ema import AdapterEMA

from pipelines.config.job import DistillConfig
from pipelines.data.prompts import PromptStream
from wadi_core.prompts.shards import BAD_REASONS
from pipelines.data.text_encoding import batch_cond, remember_conds
# Flag / counter all-reduces on the training device (NCCL takes CUDA tensors only).
from pipelines.runtime.collectives import all_ranks_true as _all_ranks_true
from pipelines.runtime.collectives import any_rank_true as _any_rank_true
from pipelines.runtime.collectives import sum_over_ranks as _sum_over_ranks
from pipelines.runtime.stop import StopWatch
from pipelines.tracking.client import start_run
from pipelines.train.checkpoint import (TamperedCheckpoint, TrainState, checkpoint_step, complete_checkpoints,
                                        file_manifest, load_first_good_checkpoint, load_training_state, mark_complete,
                                        merge_manifests, model_fingerprint, save_training_state, upload_checkpoint)
from pipelines.train.engines import DeepSpeedUpdater, build_engine, init_distributed

__all__ = ["train_loop", "dataset_name", "every"]

ROLES = ("student", "fake")
EMA_FILE = "student_ema.safetensors"  # the student EMA's state in a checkpoint (rank 0 writes it)


def dataset_name(epoch: int) -> str:
    """Each epoch is its own dataset (own file order, seed + epoch), so resume knows the order."""
    return f"prompts_epoch_{epoch}"


#: Steps between polls of Ray Train's drain notice (``ray.train.get_preemption_info``, a barrier
#: through Ray's synchronization actor: ~ms; Ray's own watcher polls the GCS every 5 s).
PREEMPTION_POLL_EVERY = int(os.environ.get("WADI_PREEMPTION_POLL_EVERY", "1"))


def every(n: int, step: int) -> bool:
    """The one cadence rule of the loop (logging, samples, checkpoints, drain polls): True on
    multiples of ``n``; ``n <= 0`` means never."""
    return n > 0 and step % n == 0


@contextlib.contextmanager
def _full_params(engines: dict[str, Any], zero_stage: int) -> Iterator[None]:
    """Under ZeRO-3 gather the adapters' parameters on every rank (a collective); else a no-op."""
    if zero_stage != 3:
        yield
        return
    import deepspeed  # noqa: PLC0415 -- DeepSpeed only in the Ray train worker

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


def _nonzero_bad(counts: dict[str, int]) -> dict[str, int]:
    """``data/bad_<reason>`` for the reasons that occurred: six flat-zero charts would open the
    run's MLflow page (the checkpoint reports and the job's result keep every counter)."""
    return {f"data/bad_{k}": v for k, v in counts.items() if v}


def _maybe_pause(cfg: DistillConfig, next_step: int, stop_watch: Any) -> None:
    """Test hook: before ``debug.pause_at_step`` wait until ``debug.pause_until`` exists (or a stop
    is requested)."""
    d = cfg.debug
    if d.pause_at_step != next_step or not d.pause_until:
        return
    deadline = time.monotonic() + 600
    while not Path(d.pause_until).exists() and not stop_watch.requested() and time.monotonic() < deadline:
        time.sleep(0.1)


class _Run:
    """State of one worker: models, engines, resume state, tracker-facing helpers.

    Built in four steps, each its own method: :meth:`_setup` (rank, device, teacher, distiller,
    fingerprint), :meth:`_build_engines` (DeepSpeed engines, updaters, student EMA, noise),
    :meth:`_resume` (the newest checkpoint that verifies) and :meth:`_sample_inputs`.
    """

    def __init__(self, cfg: DistillConfig, loop_config: dict[str, Any]):
        self.cfg = cfg
        self.loop_config = loop_config
        self._setup()
        self._build_engines()
        self._resume()
        self._sample_inputs()

    def _setup(self) -> None:
        import ray.train  # noqa: PLC0415 -- Ray only on the cluster path


        cfg = self.cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        init_distributed()
        if cfg.train.gpus_per_worker > 0 and torch.cuda.is_available():
            import ray.train.torch  # noqa: PLC0415 -- Ray only on the cluster path

            self.device = ray.train.torch.get_device()  # respects Ray's CUDA_VISIBLE_DEVICES
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        # Same seed on every rank while the adapters are initialised, so all ranks start equal.
        torch.manual_seed(cfg.train.seed)
        # data.text_encoding=actors: no text encoder here; embeddings arrive with the prompts.
        self.teacher = load_teacher(cfg.teacher, device=self.device, text_encoder=cfg.data.text_encoding == "trainer")
        if self.loop_config.get("text_conds"):  # the empty and sample prompts, encoded once by an actor
            remember_conds(self.teacher, self.loop_config["text_conds"])
        encoder = self.teacher.text_encoder
        self.text_encoder_params = sum(p.numel() for p in encoder.parameters()) if encoder is not None else 0
        self.distiller = WaDiDistiller(self.teacher, cfg.vsd)
        # Before ZeRO partitions anything: what a checkpoint of this run must have been made for.
        self.fingerprint = model_fingerprint(str(cfg.teacher), self.teacher.denoiser,
                                             {r: self.distiller.modules(r) for r in ROLES})

    def _build_engines(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed + 7919 * self.rank)
        lrs = {"student": cfg.vsd.gen_lr, "fake": cfg.vsd.fake_lr}
        self.engines = {r: build_engine(self.distiller.modules(r), lrs[r], cfg.train, cfg.vsd) for r in ROLES}
        fp16 = cfg.vsd.mixed_precision == "fp16"  # loss scaling in the updater (the engines are fp32)
        self.updaters = {r: DeepSpeedUpdater(e, fp16=fp16) for r, e in self.engines.items()}
        # Under ZeRO <= 2 every rank holds the full (identical) student: each keeps the same average.
        self.ema = (AdapterEMA(self.distiller.parameters("student"), cfg.vsd.student_ema)
                    if cfg.vsd.student_ema else None)
        # Different noise per rank; restored from the checkpoint on resume.
        self.generator = torch.Generator(self.device).manual_seed(cfg.train.seed * 1_000_003 + self.rank)

    def _resume(self) -> None:
        """Newest checkpoint first; one that fails verification (manifest, pickle allow-list) on
        any rank is skipped on all. Everything is loaded now: num_to_keep may delete it later."""
        self.state = TrainState(mlflow_run_id=self.loop_config.get("mlflow_run_id"), fingerprint=self.fingerprint)
        self.resumed_from = 0
        self.last_saved_step = -1
        self.data_wait_share_job = 0.0  # kept up to date by _train
        self.checkpoint_seconds = 0.0  # the last checkpoint's save + upload time
        self.notice_step: int | None = None  # step at which a drain (preemption) notice was seen
        self.stop_watch = StopWatch(self.loop_config.get("stop_flag"))
        self.stop_requested = False
        self.saved_before_deadline = False
        state, rejected = load_first_good_checkpoint(self._resume_candidates(), self._load_state,
                                                     agree=lambda ok: _all_ranks_true(ok, self.device))
        self.tampered_checkpoints_skipped = sum(isinstance(r, TamperedCheckpoint) for r in rejected)
        self.corrupt_checkpoints_skipped = len(rejected) - self.tampered_checkpoints_skipped
        if state is not None:
            self.state = state
            self.state.fingerprint = self.fingerprint
            self.resumed_from = self.last_saved_step = state.step

    def _sample_inputs(self) -> None:
        prompts = list(self.loop_config.get("sample_prompts") or [])
        self.sample_prompts = prompts[: self.cfg.tracking.num_sample_prompts]
        self.sample_z = torch.randn(len(self.sample_prompts), *self.teacher.latent_shape,
                                    generator=torch.Generator().manual_seed(self.cfg.train.seed + 1))

    def _load_state(self, directory: str) -> TrainState:
        """DeepSpeed engines, RNG and TrainState (pipelines.train.checkpoint), then the student EMA."""
        state = load_training_state(directory, self.engines, self.generator, self.rank, self.fingerprint,
                                    verify=False)
        if self.ema is not None:
            ema_file = Path(directory) / EMA_FILE
            if ema_file.exists():
                self.ema.load_state_dict(load_file(str(ema_file)))
            else:
                warnings.warn(f"{directory} has no {EMA_FILE}: the student EMA restarts from the current weights")
        return state

    def averaged(self) -> Any:
        """The student EMA swapped in (samples, checkpoint adapter file, export), else a no-op."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def _resume_candidates(self) -> list[Any]:
        """Ray's checkpoint for this attempt and every complete one in storage, newest first."""
        import ray.train  # noqa: PLC0415 -- Ray only on the cluster path

        found = complete_checkpoints(self.cfg.train.storage_path, self.cfg.train.run_name)
        ray_checkpoint = ray.train.get_checkpoint()
        names = {c.path.rstrip("/").rsplit("/", 1)[-1] for c in found}
        if ray_checkpoint is not None and ray_checkpoint.path.rstrip("/").rsplit("/", 1)[-1] not in names:
            found.append(ray_checkpoint)
        return sorted(found, key=lambda c: checkpoint_step(c.path), reverse=True)

    # -- one step -------------------------------------------------------------------------------
    def next_batch(self, batches: Iterator[Any]) -> Any:
        """The next batch, or None once the epoch is over or a stop was requested (SIGINT / SIGTERM
        to the driver, seen by rank 0): one collective, so every rank stops at the same step."""
        batch = next(batches, None)
        stop = self.rank == 0 and self.stop_watch.requested()
        has, stops = _sum_over_ranks([batch is not None, stop], self.device)
        if stops:
            self.stop_requested = True
        return batch if has == self.world and not stops else None

    def stream(self) -> PromptStream:
        """A :class:`PromptStream` for one epoch, with this world's collectives."""
        def gather(rows: list[Any]) -> list[list[Any]]:
            out: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(out, rows)
            return out

        return PromptStream(self.cfg.train.per_worker_batch, self.rank, self.world,
                            all_true=lambda flag: _all_ranks_true(flag, self.device), gather=gather)

    def step(self, batch: Any, guard: Any) -> dict[str, float]:
        """One VSD step on ``batch``; advances the TrainState and the student EMA."""
        s, cfg = self.state, self.cfg
        _maybe_fail(cfg, self.rank, s.step + 1)
        _maybe_pause(cfg, s.step + 1, self.stop_watch)
        cond = batch_cond(self.teacher, batch)  # here or streamed: pipelines/data/text_encoding.py
        cond = _maybe_nan(cfg, self.rank, s.step + 1, cond)
        metrics = vsd_step(self.distiller, cond, self.updaters["student"], self.updaters["fake"], self.generator)
        s.step += 1
        # A non-finite step was skipped on every rank (Updater.step): count it, stop after N in a row.
        guard.update(metrics, s.step)
        if self.ema is not None and not metrics.get("skipped_nonfinite"):
            self.ema.update()
        s.nonfinite_steps = guard.total
        s.data_position += 1
        s.prompts_seen += cfg.train.global_batch
        return metrics

    # -- logging --------------------------------------------------------------------------------
    def log_step(self, tracker: Any, metrics: dict[str, float], stream: PromptStream, step_s: float,
                 data_wait_s: float = 0.0) -> None:
        """The step's metrics; ``perf/data_wait_s`` is how long the step waited for its batch
        (``next_batch``), ``perf/data_wait_share`` that wait over the whole step (#35)."""
        s, t = self.state, self.cfg.train
        tracker.log_metrics({
            **{f"distill/{k}": v for k, v in metrics.items()}, "distill/nonfinite_steps": s.nonfinite_steps,
            "perf/step_seconds": step_s, "perf/prompts_per_second": t.global_batch / step_s,
            "perf/data_wait_s": data_wait_s, "perf/data_wait_share": data_wait_s / step_s if step_s > 0 else 0.0,
            "progress/epoch": s.epoch, "progress/prompts_seen": s.prompts_seen,
            **_nonzero_bad(self.bad_counts(stream)),
        }, step=s.step)

    def samples(self, tracker: Any, step: int) -> None:
        if not self.sample_prompts:
            return
        if self.rank != 0 and self.cfg.train.zero_stage != 3:
            return

        with _full_params(self.engines, self.cfg.train.zero_stage), self.averaged():
            images = self.distiller.sample(self.sample_prompts, z=self.sample_z)
        if self.rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                path = save_image_grid([images], Path(tmp) / f"step_{step:06d}.png", scale=None)

                with Image.open(path) as grid:  # MLflow 3's step-aware images: one slider per key
                    tracker.log_image(grid.copy(), key="samples", step=step)
                if step == self.resumed_from:  # the grid's prompts, tile by tile, once per job
                    prompts = Path(tmp) / "sample_prompts.txt"
                    prompts.write_text("".join(f"{i}: {p}\n" for i, p in enumerate(self.sample_prompts)))
                    tracker.log_artifact(prompts, "images")

    def bad_counts(self, stream: PromptStream) -> dict[str, int]:
        """Bad rows over all ranks and all epochs so far (a collective)."""
        before = self.state.meta.get("bad_before_epoch", {})
        local = [before.get(r, 0) * (self.rank == 0) + stream.bad[r] for r in BAD_REASONS]
        return dict(zip(BAD_REASONS, _sum_over_ranks(local, self.device)))

    def end_epoch(self, tracker: Any, stream: PromptStream) -> None:
        """Bad-row counts of the finished epoch (a collective); the position moves to the next."""
        s = self.state
        bad = self.bad_counts(stream)
        s.meta["bad_before_epoch"] = bad
        # Read but in no full global batch (the same on every rank: cut from the gathered pool).
        s.meta["unbatched_prompts"] = s.meta.get("unbatched_prompts", 0) + stream.remainder
        s.epoch, s.data_position = s.epoch + 1, 0
        unbatched = {"data/unbatched_prompts": s.meta["unbatched_prompts"]} if s.meta["unbatched_prompts"] else {}
        tracker.log_metrics({**_nonzero_bad(bad), **unbatched}, step=s.step)  # data/* only when it happened

    # -- preemption -----------------------------------------------------------------------------
    def preemption_checkpoint_due(self, step_seconds: float) -> bool:
        """All ranks, every ``PREEMPTION_POLL_EVERY`` steps: True when a checkpoint must be written
        now because a node of this run is being drained (spot reclaim, autoscaler v2, KubeRay, ``ray
        drain-node --reason DRAIN_NODE_REASON_PREEMPTION``): once at the notice, and once more just
        before the reclaim deadline, so a reclaim loses only the steps after that. Training goes on
        in between; at the deadline Ray Train restarts the group, which resumes from the newest."""
        import ray.train  # noqa: PLC0415 -- Ray only on the cluster path

        info = ray.train.get_preemption_info()  # a collective: the same answer on every rank
        if info is None:
            return False
        if self.notice_step is None:
            self.notice_step = self.state.step
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
        import ray.train  # noqa: PLC0415 -- Ray only on the cluster path

        started = time.perf_counter()
        step = self.state.step
        report = {**metrics, **{f"data/bad_{k}": float(v) for k, v in self.bad_counts(stream).items()},
                  "resumed_from_step": float(self.resumed_from), "step": step, "epoch": self.state.epoch,
                  "preemption/notice_step": float(-1 if self.notice_step is None else self.notice_step),
                  "distill/nonfinite_steps": float(self.state.nonfinite_steps),
                  "resume/corrupt_checkpoints_skipped": float(self.corrupt_checkpoints_skipped),
                  "resume/tampered_checkpoints_skipped": float(self.tampered_checkpoints_skipped),
                  "data/unbatched_prompts": float(self.state.meta.get("unbatched_prompts", 0)),
                  "stopped": float(self.stop_requested),
                  # this job's steps: time waiting for prompts over step time (the summary prints it;
                  # Ray's result keeps the newest checkpoint's report, so each one carries it)
                  "perf/data_wait_share_job": self.data_wait_share_job,
                  "worker/text_encoder_params": float(self.text_encoder_params)}
        if step in (self.last_saved_step, 0):  # nothing new to keep (step 0: nothing trained)
            ray.train.report(report)
            return
        self.last_saved_step = step
        name = f"checkpoint_{step:08d}"
        with tempfile.TemporaryDirectory(prefix="wadi-ckpt-") as tmp:
            save_training_state(tmp, self.engines, self.generator, self.state, self.rank)
            self.save_student_adapter(Path(tmp) / "adapters" / "student.safetensors")
            if self.ema is not None and self.rank == 0:  # the average's own state, for resume
                save_file(self.ema.state_dict(), str(Path(tmp) / EMA_FILE))
            # What every rank wrote, hashed before upload: COMPLETE holds it, resume checks it.
            manifests: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(manifests, file_manifest(tmp))
            # Our upload: every file retried on transient storage faults (pipelines.train.checkpoint).
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
        with _full_params(self.engines, self.cfg.train.zero_stage):
            if self.rank == 0:
                with self.averaged():  # what an evaluation of this checkpoint should see
                    save_adapter_file(path, adapter_state_dict(self.distiller.denoiser, "student"),
                                      self.cfg.vsd.student, self.distiller.teacher.family, "student",
                                      student_alphabar=self.distiller.student_alphabar)

    def export(self) -> str | None:
        """Rank 0 writes the merged one-step pipeline (+ adapters) and uploads it to export_uri."""
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
    import ray.train  # noqa: PLC0415 -- Ray only on the cluster path

    s = run.state
    for epoch in range(s.epoch, run.loop_config["num_epochs"]):
        skip = s.data_position if epoch == s.epoch else 0
        yield epoch, ray.train.get_dataset_shard(dataset_name(epoch)), skip


def _after_step(run: _Run, tracker: Any, metrics: dict[str, float], stream: PromptStream, step_s: float,
                done: bool, data_wait_s: float = 0.0) -> None:
    """Everything on a cadence (:func:`every`) after a step: metrics, sample grid, checkpoint, and
    a checkpoint when a drain notice says a node is about to go. All ranks call it."""
    cfg, step = run.cfg, run.state.step
    if every(cfg.train.log_every, step):
        run.log_step(tracker, metrics, stream, step_s, data_wait_s)
    if every(cfg.tracking.sample_every, step):
        run.samples(tracker, step)
    if done:  # the closing checkpoint is written after the export
        return
    if every(cfg.train.checkpoint_every, step):
        run.checkpoint(metrics, stream)
    if every(PREEMPTION_POLL_EVERY, step) and run.preemption_checkpoint_due(step_s):
        run.checkpoint(metrics, stream)  # a step already saved is not saved twice
        tracker.log_metrics({"preemption/checkpoint_step": step}, step=step)


class _Progress:
    """Rank 0's progress for a person: one ``[wadi]`` line every tenth of the steps (the console
    shows those; the tqdm bar goes to the job's log, pipelines/runtime/console.py)."""

    def __init__(self, total: int | None, start: int, active: bool):
        self.total, self.start, self.active = total, start, active
        self.every = max(1, (total or 0) // 10) if total else 100
        self.t0 = time.perf_counter()
        self.wait_s = self.step_s = 0.0  # steps after each epoch's first (#35: does a step wait?)

    @property
    def wait_share(self) -> float:
        """Time steps waited for their batch over their whole time, this job, each epoch's first
        step left out (its wait is the data pipeline starting)."""
        return self.wait_s / self.step_s if self.step_s else 0.0

    def update(self, step: int, metrics: dict[str, float], timing: tuple[float, float] | None = None) -> None:
        if timing is not None:
            self.wait_s, self.step_s = self.wait_s + timing[0], self.step_s + timing[1]
        if not self.active or not (step % self.every == 0 or step == self.total):
            return
        rate = (step - self.start) / max(time.perf_counter() - self.t0, 1e-9)
        left = f" | {(self.total - step) / rate / 60:.1f} min left" if self.total and rate > 0 else ""
        of = f"/{self.total}" if self.total else ""
        losses = " | ".join(f"{k} {metrics[k]:.4g}" for k in ("loss_gen", "loss_fake") if k in metrics)
        speed = f"{rate:.2f} steps/s" if rate >= 0.1 else f"{1 / rate:.0f} s/step" if rate > 0 else "first step"
        print(f"[wadi] step {step}{of} | {losses} | {speed} | data wait {100 * self.wait_share:.1f} % "
              f"of step time{left}", flush=True)


def _train(run: _Run, tracker: Any) -> tuple[dict[str, float], PromptStream]:
    """The epochs from the resumed position to ``data.max_steps`` (or the last epoch)."""
    s, cfg = run.state, run.cfg
    max_steps = cfg.data.max_steps
    guard = NonFiniteGuard(cfg.train.max_nonfinite_in_a_row, total=s.nonfinite_steps)
    metrics: dict[str, float] = {}
    stream = run.stream()
    done = bool(max_steps) and s.step >= max_steps
    progress = _Progress(max_steps or run.loop_config.get("total_steps"), s.step, run.rank == 0)
    with tqdm(total=max_steps or run.loop_config.get("total_steps"), initial=s.step, desc=f"vsd rank {run.rank}",
              disable=run.rank != 0, mininterval=5) as bar:
        for _, shard, skip in _epochs(run):
            if done:
                break
            stream = run.stream()
            batches = stream.batches(shard, skip=skip)
            t_last = time.perf_counter()
            while True:
                t_ask = time.perf_counter()
                batch = run.next_batch(batches)  # the data wait: this rank's prompts + one collective
                if batch is None:
                    break
                wait_s = time.perf_counter() - t_ask
                first_of_epoch = s.data_position == skip  # its wait is the data pipeline starting
                metrics = run.step(batch, guard)
                now = time.perf_counter()
                step_s, t_last = now - t_last, now
                bar.update(1)
                done = bool(max_steps) and s.step >= max_steps
                progress.update(s.step, metrics, None if first_of_epoch else (wait_s, step_s))
                run.data_wait_share_job = progress.wait_share  # every checkpoint's report carries it
                _after_step(run, tracker, metrics, stream, step_s, done, wait_s)
                if done:
                    break
            if run.stop_requested:
                break
            if not done:
                run.end_epoch(tracker, stream)
                stream = run.stream()
    return metrics, stream


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point (``train_loop_config``: flat config, MLflow ids, export uri, prompts)."""
    cfg = from_dict(DistillConfig, loop_config["config"])
    run = _Run(cfg, loop_config)
    tracking = contextlib.nullcontext(None)
    if run.rank == 0 and loop_config.get("mlflow_run_id"):
        # System metrics from rank 0's node (a GPU worker; the driver's head node has none).
        tracking = start_run(cfg.tracking.experiment, tracking_uri=loop_config["tracking_uri"],
                             run_id=loop_config["mlflow_run_id"], log_system_metrics=True)
    with tracking as tracker:
        tracker = tracker or _NullTracker()
        if run.resumed_from:
            tracker.log_metrics({"resume/from_step": run.resumed_from}, step=run.resumed_from)
        if run.cfg.tracking.sample_every and not run.resumed_from:
            run.samples(tracker, 0)  # the student at init: the slider starts where training does
        if run.corrupt_checkpoints_skipped or run.tampered_checkpoints_skipped:
            tracker.log_metrics({"resume/corrupt_checkpoints_skipped": run.corrupt_checkpoints_skipped,
                                 "resume/tampered_checkpoints_skipped": run.tampered_checkpoints_skipped},
                                step=run.resumed_from)
        metrics, stream = _train(run, tracker)
        step = run.state.step
        tracker.log_metrics(_nonzero_bad(run.bad_counts(stream)), step=step)
        if run.stop_requested:  # the driver got SIGINT / SIGTERM: keep this step, no export
            if run.rank == 0:
                print(f"[wadi] stop requested: checkpointing step {step} and stopping", flush=True)
            run.checkpoint(metrics, stream)
            return
        if not every(cfg.tracking.sample_every, step):
            run.samples(tracker, step)  # the final grid (unless this step just made one)
        export_uri = run.export()
        if export_uri:
            tracker.set_tags({"wadi.export_uri": export_uri})
        run.checkpoint(metrics, stream)


class _NullTracker:
    """Stands in for the MLflow tracker on ranks other than 0."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None
