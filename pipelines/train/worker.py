"""The Ray Train worker: a :class:`Trainer` runs prompts -> text encoder -> ``vsd_step`` on two DeepSpeed engines.

Every worker loads the teacher, adds the "student" and "fake" adapters (one frozen shared base)
and wraps each adapter's modules in its own DeepSpeed engine. Rank 0 logs to MLflow; every rank
writes its share of each checkpoint and reports the same checkpoint directory name, which Ray
merges into one directory in ``RunConfig.storage_path``. ``train_loop`` is Ray Train's entry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any, ContextManager, Iterator

import torch
from PIL import Image
from tqdm.auto import tqdm

from wadi_core import storage
from wadi_core.config import from_dict
from wadi_core.export import export_one_step_pipeline
from wadi_core.images import save_image_grid
from wadi_core.models import Teacher, load_teacher
from wadi_core.prompts.shards import BAD_REASONS
from wadi_core.vsd import KeyedDraws, NonFiniteGuard, WaDiDistiller, vsd_step
from wadi_core.vsd.draws import slice_draws
from wadi_core.vsd.bookkeeping import StepBookkeeper, ema_applied, every
from wadi_core.vsd.ema import AdapterEMA

from pipelines.config.job import DistillConfig
from pipelines.data.prompts import PromptStream
from pipelines.data.text_encoding import batch_cond, remember_conds
# Flag / counter all-reduces on the training device (NCCL takes CUDA tensors only).
from pipelines.runtime.collectives import all_ranks_true, sum_over_ranks, weighted_mean_over_ranks
from pipelines.runtime.stop import StopWatch
from pipelines.tracking.client import start_run
from pipelines.train.checkpoint import TrainState, model_fingerprint
from pipelines.train.checkpoint_manager import CheckpointManager
from pipelines.train.engines import DeepSpeedUpdater, build_engine, full_params, init_distributed
from pipelines.train.preemption import PREEMPTION_POLL_EVERY, PreemptionWatch

__all__ = ["Trainer", "Progress", "NullTracker", "train_loop", "dataset_name"]

ROLES = ("student", "fake")


def dataset_name(epoch: int) -> str:
    """Each epoch is its own dataset (own file order, seed + epoch), so resume knows the order."""
    return f"prompts_epoch_{epoch}"


def _maybe_nan(cfg: DistillConfig, rank: int, step: int, cond: Any) -> Any:
    """Fault injection for tests: NaN text embeddings on ``debug.nan_rank`` at ``debug.nan_at_step``."""
    d = cfg.debug
    if d.nan_at_step != step or d.nan_rank not in (-1, rank):
        return cond
    return dataclasses.replace(cond, embeds=cond.embeds * float("nan"))


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
    is requested); ``<pause_until>.waiting`` appears once a rank waits there, so a test can act on a run held
    at that step (every rank then has taken the step before, its stop check included)."""
    d = cfg.debug
    if d.pause_at_step != next_step or not d.pause_until:
        return
    Path(f"{d.pause_until}.waiting").touch()
    deadline = time.monotonic() + 600
    while not Path(d.pause_until).exists() and not stop_watch.requested() and time.monotonic() < deadline:
        time.sleep(0.1)


class Progress:
    """Rank 0's progress for a person: one ``[wadi]`` line every tenth of the steps (the console
    shows those; the tqdm bar goes to the job's log, pipelines/runtime/console.py)."""

    def __init__(self, total: int | None, start: int, active: bool):
        self.total, self.start, self.active = total, start, active
        self.print_every = max(1, (total or 0) // 10) if total else 100
        self.t0 = time.perf_counter()
        self.wait_s = self.step_s = 0.0  # steps after each epoch's first (#35: does a step wait?)

    @property
    def wait_share(self) -> float:
        """Time steps waited for their batch over their whole time, this job, each epoch's first
        step left out (its wait is the data pipeline starting)."""
        return self.wait_s / self.step_s if self.step_s else 0.0

    def update(self, step: int, metrics: dict[str, float], timing: tuple[float, float] | None = None) -> None:
        """Add a step's (wait, step) seconds; print the line on the cadence and at the last step."""
        if timing is not None:
            self.wait_s, self.step_s = self.wait_s + timing[0], self.step_s + timing[1]
        if not self.active or not (every(self.print_every, step) or step == self.total):
            return
        rate = (step - self.start) / max(time.perf_counter() - self.t0, 1e-9)
        left = f" | {(self.total - step) / rate / 60:.1f} min left" if self.total and rate > 0 else ""
        of = f"/{self.total}" if self.total else ""
        losses = " | ".join(f"{k} {metrics[k]:.4g}" for k in ("loss_gen", "loss_fake") if k in metrics)
        speed = f"{rate:.2f} steps/s" if rate >= 0.1 else f"{1 / rate:.0f} s/step" if rate > 0 else "first step"
        print(f"[wadi] step {step}{of} | {losses} | {speed} | data wait {100 * self.wait_share:.1f} % "
              f"of step time{left}", flush=True)


class NullTracker:
    """Stands in for the MLflow tracker on ranks other than 0."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class Trainer:
    """One Ray Train worker's distillation run, built from the components declared below.

    Built in four steps: :meth:`_setup` (rank, device, teacher, distiller, fingerprint),
    :meth:`_build_engines` (DeepSpeed engines, updaters, student EMA, noise), the resume
    (:class:`CheckpointManager`, the newest checkpoint that verifies) and :meth:`_sample_inputs`;
    :meth:`train` then runs the epochs, the export and the closing checkpoint.
    """

    # configuration
    cfg: DistillConfig
    loop_config: dict[str, Any]  # Ray Train's train_loop_config: flat config, MLflow ids, export uri, prompts

    # the models
    teacher: Teacher
    text_encoder_params: int  # 0 when the embeddings arrive with the prompts (data.text_encoding=actors)
    distiller: WaDiDistiller  # one frozen base with the "student" and "fake" adapters
    fingerprint: dict[str, str]  # what a checkpoint of this run must have been made for
    engines: dict[str, Any]  # a DeepSpeed engine per role
    updaters: dict[str, DeepSpeedUpdater]  # what vsd_step drives, per role
    ema: AdapterEMA | None  # the student's average (vsd.student_ema)

    # components
    bookkeeper: StepBookkeeper  # after each step: step counter, non-finite guard, EMA, counters
    checkpointer: CheckpointManager
    preemption: PreemptionWatch  # drain notices and stop requests
    progress: Progress | None  # set by train_epochs
    tracker: Any  # MLflow on rank 0 (with a run id), NullTracker elsewhere; set by train

    # runtime
    rank: int
    world: int
    device: torch.device
    share: tuple[int, int]  # [start, stop) of this rank's share of each global batch (the same global batch at any world)
    sample_prompts: list[str]  # the sample grid's fixed prompts ...
    sample_z: torch.Tensor  # ... and noise

    # training state
    state: TrainState  # where the run is: step, epoch, data position, counters
    data_wait_share_job: float  # this job's data wait over step time (every checkpoint report carries it)

    def __init__(self, cfg: DistillConfig, loop_config: dict[str, Any]):
        self.cfg = cfg
        self.loop_config = loop_config
        self._setup()
        self._build_engines()
        self.preemption = PreemptionWatch(StopWatch(loop_config.get("stop_flag")), self.rank, self.world,
                                          self.device)
        self.checkpointer = CheckpointManager(cfg, self.distiller, self.engines, self.ema, self.fingerprint,
                                              self.rank, self.world, self.device)
        self.state = self.checkpointer.resume(
            TrainState(mlflow_run_id=loop_config.get("mlflow_run_id"), fingerprint=self.fingerprint))
        self.bookkeeper = StepBookkeeper(NonFiniteGuard(cfg.train.max_nonfinite_in_a_row,
                                                        total=self.state.nonfinite_steps), self.ema)
        self.progress, self.tracker, self.data_wait_share_job = None, NullTracker(), 0.0
        self._sample_inputs()

    def _setup(self) -> None:
        """Rank, device, teacher, distiller and the fingerprint of what this run trains."""
        import ray.train  # noqa: PLC0415 -- Ray only on the cluster path

        cfg = self.cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.share = cfg.train.rank_slice(self.rank, self.world)  # an elastic run's world size varies
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
        """DeepSpeed engines and updaters per role, and the student EMA."""
        cfg = self.cfg
        lrs = {"student": cfg.vsd.gen_lr, "fake": cfg.vsd.fake_lr}
        self.engines = {r: build_engine(self.distiller.modules(r), lrs[r], cfg.train, cfg.vsd, self.world)
                        for r in ROLES}
        fp16 = cfg.vsd.mixed_precision == "fp16"  # loss scaling in the updater (the engines are fp32)
        start, stop = self.share  # an uneven share of the global batch weighs its loss by its size
        weight = (stop - start) * self.world / cfg.train.global_batch
        self.updaters = {r: DeepSpeedUpdater(e, fp16=fp16, loss_weight=weight) for r, e in self.engines.items()}
        # Under ZeRO <= 2 every rank holds the full (identical) student: each keeps the same average.
        self.ema = (AdapterEMA(self.distiller.parameters("student"), cfg.vsd.student_ema)
                    if cfg.vsd.student_ema else None)

    def _sample_inputs(self) -> None:
        """Fixed prompts and noise for the sample grids, so grids of different steps compare."""
        prompts = list(self.loop_config.get("sample_prompts") or [])
        self.sample_prompts = prompts[: self.cfg.tracking.num_sample_prompts]
        self.sample_z = torch.randn(len(self.sample_prompts), *self.teacher.latent_shape,
                                    generator=torch.Generator().manual_seed(self.cfg.train.seed + 1))

    # -- the run --------------------------------------------------------------------------------
    def train(self) -> None:
        """The whole job on this rank: epochs, final samples, export, closing checkpoint (all ranks)."""
        cfg, resumed_from = self.cfg, self.checkpointer.resumed_from
        tracking: ContextManager[Any] = contextlib.nullcontext(None)
        if self.rank == 0 and self.loop_config.get("mlflow_run_id"):
            # System metrics from rank 0's node (a GPU worker; the driver's head node has none).
            tracking = start_run(cfg.tracking.experiment, tracking_uri=self.loop_config["tracking_uri"],
                                 run_id=self.loop_config["mlflow_run_id"], log_system_metrics=True)
        with tracking as tracker:
            self.tracker = tracker or NullTracker()
            if resumed_from:
                self.tracker.log_metrics({"resume/from_step": resumed_from}, step=resumed_from)
            if cfg.tracking.sample_every and not resumed_from:
                self.samples(0)  # the student at init: the slider starts where training does
            if self.checkpointer.corrupt_skipped or self.checkpointer.tampered_skipped:
                self.tracker.log_metrics({"resume/corrupt_checkpoints_skipped": self.checkpointer.corrupt_skipped,
                                          "resume/tampered_checkpoints_skipped": self.checkpointer.tampered_skipped},
                                         step=resumed_from)
            metrics, stream = self.train_epochs()
            step = self.state.step
            self.tracker.log_metrics(_nonzero_bad(self.bad_counts(stream)), step=step)
            if self.preemption.stop_requested:  # the driver got SIGINT / SIGTERM: keep this step, no export
                if self.rank == 0:
                    print(f"[wadi] stop requested: checkpointing step {step} and stopping", flush=True)
                self.checkpoint(metrics, stream)
                return
            if not every(cfg.tracking.sample_every, step):
                self.samples(step)  # the final grid (unless this step just made one)
            export_uri = self.export()
            if export_uri:
                self.tracker.set_tags({"wadi.export_uri": export_uri})
            self.checkpoint(metrics, stream)

    def epochs(self) -> Iterator[tuple[int, Any, int]]:
        """(epoch, dataset shard, batches to skip) from the resumed position on."""
        import ray.train  # noqa: PLC0415 -- Ray only on the cluster path

        s = self.state
        for epoch in range(s.epoch, self.loop_config["num_epochs"]):
            skip = s.data_position if epoch == s.epoch else 0
            yield epoch, ray.train.get_dataset_shard(dataset_name(epoch)), skip

    def train_epochs(self) -> tuple[dict[str, float], PromptStream]:
        """The epochs from the resumed position to ``data.max_steps`` (or the last epoch)."""
        s, max_steps = self.state, self.cfg.data.max_steps
        total = max_steps or self.loop_config.get("total_steps")
        metrics: dict[str, float] = {}
        stream = self.stream()
        done = bool(max_steps) and s.step >= max_steps
        self.progress = Progress(total, s.step, self.rank == 0)
        with tqdm(total=total, initial=s.step, desc=f"vsd rank {self.rank}", disable=self.rank != 0,
                  mininterval=5) as bar:
            for _, shard, skip in self.epochs():
                if done:
                    break
                stream = self.stream()
                batches = stream.batches(shard, skip=skip)
                t_last = time.perf_counter()
                while True:
                    t_ask = time.perf_counter()
                    batch = self.next_batch(batches)  # the data wait: this rank's prompts + one collective
                    if batch is None:
                        break
                    wait_s = time.perf_counter() - t_ask
                    first_of_epoch = s.data_position == skip  # its wait is the data pipeline starting
                    metrics = self.step(batch)
                    now = time.perf_counter()
                    step_s, t_last = now - t_last, now
                    bar.update(1)
                    done = bool(max_steps) and s.step >= max_steps
                    self.progress.update(s.step, metrics, None if first_of_epoch else (wait_s, step_s))
                    self.data_wait_share_job = self.progress.wait_share  # every checkpoint's report carries it
                    self.after_step(metrics, stream, step_s, done, wait_s)
                    if done:
                        break
                if self.preemption.stop_requested:
                    break
                if not done:
                    self.end_epoch(stream)
                    stream = self.stream()
        return metrics, stream

    # -- one step -------------------------------------------------------------------------------
    def next_batch(self, batches: Iterator[Any]) -> Any:
        """The next batch, or None once the epoch is over or a stop was requested (SIGINT / SIGTERM
        to the driver, seen by rank 0): one collective, so every rank stops at the same step."""
        batch = next(batches, None)
        return batch if self.preemption.go_on(batch is not None) else None

    def stream(self) -> PromptStream:
        """A :class:`PromptStream` for one epoch, with this world's collectives."""
        def gather(rows: list[Any]) -> list[list[Any]]:
            out: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(out, rows)
            return out

        elastic = self.cfg.train.elastic  # replicated: the batch size is the global batch, sliced by rank
        return PromptStream(self.cfg.train.global_batch if elastic else self.cfg.train.per_worker_batch, self.rank,
                            self.world,
                            all_true=lambda flag: all_ranks_true(flag, self.device), gather=gather,
                            replicated=elastic)

    def draws(self, n: int) -> KeyedDraws:
        """The step's noise, timesteps and null-prompt coins, keyed by (seed, epoch, global sample
        index): sample ``i`` of this rank's slice of global batch ``data_position`` draws the same at
        any world size, and a resumed run draws what it would have drawn (nothing to checkpoint)."""
        s, t = self.state, self.cfg.train
        start, stop = self.share
        if n != stop - start:
            raise RuntimeError(f"rank {self.rank} got {n} prompts, expected {stop - start} (its share of the global "
                               f"batch of {t.global_batch} over {self.world} ranks)")
        return slice_draws(t.seed, s.epoch, s.data_position, t.global_batch, start, stop)

    def step(self, batch: Any) -> dict[str, float]:
        """One VSD step on ``batch``; the bookkeeper advances the TrainState and the student EMA.
        ``loss_gen`` / ``loss_fake`` are the global batch's (all-reduced, weighted by sample count)."""
        s, cfg = self.state, self.cfg
        _maybe_fail(cfg, self.rank, s.step + 1)
        _maybe_pause(cfg, s.step + 1, self.preemption.stop_watch)
        cond = batch_cond(self.teacher, batch)  # here or streamed: pipelines/data/text_encoding.py
        cond = _maybe_nan(cfg, self.rank, s.step + 1, cond)
        metrics = vsd_step(self.distiller, cond, self.updaters["student"], self.updaters["fake"],
                           self.draws(len(cond)))
        metrics["loss_gen"], metrics["loss_fake"] = weighted_mean_over_ranks(
            [metrics["loss_gen"], metrics["loss_fake"]], len(cond), self.device)
        # A non-finite step was skipped on every rank (Updater.step): counted, N in a row stop the run.
        self.bookkeeper.after_step(s, metrics, consumed=1, prompts=cfg.train.global_batch)
        return metrics

    def after_step(self, metrics: dict[str, float], stream: PromptStream, step_s: float, done: bool,
                   data_wait_s: float = 0.0) -> None:
        """Everything on a cadence (:func:`every`) after a step: metrics, sample grid, checkpoint, and
        a checkpoint when a drain notice says a node is about to go. All ranks call it."""
        cfg, step = self.cfg, self.state.step
        if every(cfg.train.log_every, step):
            self.log_step(metrics, stream, step_s, data_wait_s)
        if every(cfg.tracking.sample_every, step):
            self.samples(step)
        if done:  # the closing checkpoint is written after the export
            return
        if every(cfg.train.checkpoint_every, step):
            self.checkpoint(metrics, stream)
        if every(PREEMPTION_POLL_EVERY, step) and self.preemption.checkpoint_due(step, step_s,
                                                                                 self.checkpointer.seconds):
            self.checkpoint(metrics, stream)  # a step already saved is not saved twice
            self.tracker.log_metrics({"preemption/checkpoint_step": step}, step=step)

    # -- logging --------------------------------------------------------------------------------
    def log_step(self, metrics: dict[str, float], stream: PromptStream, step_s: float,
                 data_wait_s: float = 0.0) -> None:
        """The step's metrics; ``perf/data_wait_s`` is how long the step waited for its batch
        (``next_batch``), ``perf/data_wait_share`` that wait over the whole step (#35)."""
        s, t = self.state, self.cfg.train
        self.tracker.log_metrics({
            **{f"distill/{k}": v for k, v in metrics.items()}, "distill/nonfinite_steps": s.nonfinite_steps,
            "perf/step_seconds": step_s, "perf/prompts_per_second": t.global_batch / step_s,
            "perf/data_wait_s": data_wait_s, "perf/data_wait_share": data_wait_s / step_s if step_s > 0 else 0.0,
            "progress/epoch": s.epoch, "progress/prompts_seen": s.prompts_seen, "train/world_size": self.world,
            **_nonzero_bad(self.bad_counts(stream)),
        }, step=s.step)

    def samples(self, step: int) -> None:
        """The sample grid of the (averaged) student at ``step``, logged by rank 0 (collective under ZeRO-3)."""
        if not self.sample_prompts:
            return
        if self.rank != 0 and self.cfg.train.zero_stage != 3:
            return

        with full_params(self.engines, self.cfg.train.zero_stage), ema_applied(self.ema):
            images = self.distiller.sample(self.sample_prompts, z=self.sample_z)
        if self.rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                path = save_image_grid([images], Path(tmp) / f"step_{step:06d}.png", scale=None)

                with Image.open(path) as grid:  # MLflow 3's step-aware images: one slider per key
                    self.tracker.log_image(grid.copy(), key="samples", step=step)
                if step == self.checkpointer.resumed_from:  # the grid's prompts, tile by tile, once per job
                    prompts = Path(tmp) / "sample_prompts.txt"
                    prompts.write_text("".join(f"{i}: {p}\n" for i, p in enumerate(self.sample_prompts)))
                    self.tracker.log_artifact(prompts, "images")

    def bad_counts(self, stream: PromptStream) -> dict[str, int]:
        """Bad rows over all ranks and all epochs so far (a collective)."""
        before = self.state.meta.get("bad_before_epoch", {})
        local = [before.get(r, 0) * (self.rank == 0) + stream.bad[r] for r in BAD_REASONS]
        return dict(zip(BAD_REASONS, sum_over_ranks(local, self.device)))

    def end_epoch(self, stream: PromptStream) -> None:
        """Bad-row counts of the finished epoch (a collective); the position moves to the next."""
        s = self.state
        bad = self.bad_counts(stream)
        s.meta["bad_before_epoch"] = bad
        # Read but in no full global batch (the same on every rank: cut from the gathered pool).
        s.meta["unbatched_prompts"] = s.meta.get("unbatched_prompts", 0) + stream.remainder
        s.epoch, s.data_position = s.epoch + 1, 0
        unbatched = {"data/unbatched_prompts": s.meta["unbatched_prompts"]} if s.meta["unbatched_prompts"] else {}
        self.tracker.log_metrics({**_nonzero_bad(bad), **unbatched}, step=s.step)  # data/* only when it happened

    # -- checkpoints and export -----------------------------------------------------------------
    def checkpoint(self, metrics: dict[str, float], stream: PromptStream) -> None:
        """Save and report this step's checkpoint with the job's counters (all ranks)."""
        s, checkpointer, preemption = self.state, self.checkpointer, self.preemption
        report = {**metrics, **{f"data/bad_{k}": float(v) for k, v in self.bad_counts(stream).items()},
                  "resumed_from_step": float(checkpointer.resumed_from), "step": s.step, "epoch": s.epoch,
                  "preemption/notice_step": float(-1 if preemption.notice_step is None else preemption.notice_step),
                  "distill/nonfinite_steps": float(s.nonfinite_steps),
                  "resume/corrupt_checkpoints_skipped": float(checkpointer.corrupt_skipped),
                  "resume/tampered_checkpoints_skipped": float(checkpointer.tampered_skipped),
                  "data/unbatched_prompts": float(s.meta.get("unbatched_prompts", 0)),
                  "stopped": float(preemption.stop_requested),
                  # this job's steps: time waiting for prompts over step time (the summary prints it;
                  # Ray's result keeps the newest checkpoint's report, so each one carries it)
                  "perf/data_wait_share_job": self.data_wait_share_job,
                  "worker/text_encoder_params": float(self.text_encoder_params), "train/world_size": self.world}
        checkpointer.save(s, report)

    def export(self) -> str | None:
        """Rank 0 writes the merged one-step pipeline (+ adapters) and uploads it to export_uri."""
        uri = self.loop_config["export_uri"]
        with full_params(self.engines, self.cfg.train.zero_stage):
            if self.rank != 0:
                return None
            with tempfile.TemporaryDirectory(prefix="wadi-export-") as tmp, ema_applied(self.ema):
                out = export_one_step_pipeline(self.distiller, Path(tmp) / "export")
                storage.upload_dir(out, uri)
        return uri


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point (``train_loop_config``: flat config, MLflow ids, export uri, prompts)."""
    Trainer(from_dict(DistillConfig, loop_config["config"]), loop_config).train()
