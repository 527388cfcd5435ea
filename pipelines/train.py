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
from pathlib import Path
from typing import Any, Iterator

import torch

from wadi_core.config import from_dict

from pipelines.checkpoint import Progress, load_training_state, mark_complete, model_fingerprint, save_training_state
from pipelines.config import DistillConfig
from pipelines.data import PromptStream
from pipelines.tarshards import BAD_REASONS

__all__ = ["train_loop", "dataset_name"]

ROLES = ("student", "fake")


def dataset_name(epoch: int) -> str:
    """Each epoch is its own dataset (own file order, seed + epoch), so resume knows the order."""
    return f"prompts_epoch_{epoch}"


def _all_ranks_true(flag: bool) -> bool:
    """Collective AND: an epoch ends for everyone when any rank runs out of full batches."""
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _sum_over_ranks(values: list[int]) -> list[int]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [int(v) for v in t.tolist()]


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
        self.teacher = load_teacher(cfg.teacher, device=self.device)
        self.distiller = WaDiDistiller(self.teacher, cfg.vsd)
        # Before ZeRO partitions anything: what a checkpoint of this run must have been made for.
        self.fingerprint = model_fingerprint(str(cfg.teacher), self.teacher.denoiser,
                                             {r: self.distiller.modules(r) for r in ROLES})
        torch.manual_seed(cfg.train.seed + 7919 * self.rank)
        lrs = {"student": cfg.vsd.gen_lr, "fake": cfg.vsd.fake_lr}
        self.engines = {r: build_engine(self.distiller.modules(r), lrs[r], cfg.train, cfg.vsd) for r in ROLES}
        self.updaters = {r: DeepSpeedUpdater(e) for r, e in self.engines.items()}
        # Different noise per rank; restored from the checkpoint on resume.
        self.generator = torch.Generator(self.device).manual_seed(cfg.train.seed * 1_000_003 + self.rank)
        self.progress = Progress(mlflow_run_id=loop_config.get("mlflow_run_id"), fingerprint=self.fingerprint)
        self.resumed_from = 0
        self.last_saved_step = -1
        checkpoint = self._latest_checkpoint()
        if checkpoint is not None:
            # Load everything now: num_to_keep may delete this directory once newer ones exist.
            with checkpoint.as_directory() as d:
                self.progress = load_training_state(d, self.engines, self.generator, self.rank, self.fingerprint)
            self.progress.fingerprint = self.fingerprint
            self.resumed_from = self.last_saved_step = self.progress.step
        prompts = list(loop_config.get("sample_prompts") or [])
        self.sample_prompts = prompts[: cfg.tracking.num_sample_prompts]
        self.sample_z = torch.randn(len(self.sample_prompts), *self.teacher.latent_shape,
                                    generator=torch.Generator().manual_seed(cfg.train.seed + 1))

    def _latest_checkpoint(self) -> Any | None:
        """Ray's checkpoint for this attempt, or a newer complete one found in storage."""
        import ray.train

        from pipelines.checkpoint import checkpoint_step, latest_complete_checkpoint

        candidates = [c for c in (ray.train.get_checkpoint(), latest_complete_checkpoint(
            self.cfg.train.storage_path, self.cfg.train.run_name)) if c is not None]
        return max(candidates, key=lambda c: checkpoint_step(c.path), default=None)

    # -- logging --------------------------------------------------------------------------------
    def samples(self, tracker: Any, step: int) -> None:
        if not self.sample_prompts:
            return
        if self.rank != 0 and self.cfg.train.zero_stage != 3:
            return
        from wadi_core.vsd.train import save_image_grid

        with _full_params(self.engines, self.cfg.train.zero_stage):
            images = self.distiller.sample(self.sample_prompts, z=self.sample_z)
        if self.rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                path = save_image_grid([images], Path(tmp) / f"step_{step:06d}.png")
                tracker.log_artifact(path, "samples")

    def bad_counts(self, stream: PromptStream) -> dict[str, int]:
        """Bad rows over all ranks and all epochs so far (a collective)."""
        local = [self.progress.bad_before_epoch.get(r, 0) * (self.rank == 0) + stream.bad[r] for r in BAD_REASONS]
        return dict(zip(BAD_REASONS, _sum_over_ranks(local)))

    # -- checkpoints ----------------------------------------------------------------------------
    def checkpoint(self, metrics: dict[str, float], stream: PromptStream) -> None:
        """Save and report a checkpoint (all ranks). A step already saved is reported without
        one: re-reporting the same directory name would let num_to_keep delete it."""
        import ray.train

        step = self.progress.step
        report = {**metrics, **{f"data/bad_{k}": float(v) for k, v in self.bad_counts(stream).items()},
                  "resumed_from_step": float(self.resumed_from), "step": step, "epoch": self.progress.epoch}
        if step == self.last_saved_step:
            ray.train.report(report)
            return
        self.last_saved_step = step
        name = f"checkpoint_{step:08d}"
        with tempfile.TemporaryDirectory(prefix="wadi-ckpt-") as tmp:
            save_training_state(tmp, self.engines, self.generator, self.progress, self.rank)
            self.save_student_adapter(Path(tmp) / "adapters" / "student.safetensors")
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
        # report() uploads synchronously; once every rank is past it the directory is whole.
        torch.distributed.barrier()
        if self.rank == 0:
            mark_complete(self.cfg.train.storage_path, self.cfg.train.run_name, name)

    def save_student_adapter(self, path: Path) -> None:
        """Rank 0 adds the student adapter as a plain safetensors file, so a checkpoint can be
        evaluated (``jobs/evaluate.py schedule``) without DeepSpeed. Collective under ZeRO-3."""
        from wadi_core.adapters import adapter_state_dict
        from wadi_core.export import save_adapter_file

        with _full_params(self.engines, self.cfg.train.zero_stage):
            if self.rank == 0:
                save_adapter_file(path, adapter_state_dict(self.distiller.denoiser, "student"),
                                  self.cfg.vsd.student, self.distiller.teacher.family, "student")

    def export(self) -> str | None:
        """Rank 0 writes the merged one-step pipeline (+ adapters) and uploads it to export_uri."""
        from wadi_core import storage
        from wadi_core.export import export_one_step_pipeline

        uri = self.loop_config["export_uri"]
        with _full_params(self.engines, self.cfg.train.zero_stage):
            if self.rank != 0:
                return None
            with tempfile.TemporaryDirectory(prefix="wadi-export-") as tmp:
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

    from pipelines.tracking import start_run

    cfg = from_dict(DistillConfig, loop_config["config"])
    run = _Run(cfg, loop_config)
    p, t = run.progress, cfg.train
    max_steps = cfg.data.max_steps
    tracking = contextlib.nullcontext(None)
    if run.rank == 0 and loop_config.get("mlflow_run_id"):
        tracking = start_run(cfg.tracking.experiment, tracking_uri=loop_config["tracking_uri"],
                             run_id=loop_config["mlflow_run_id"])
    with tracking as tracker:
        tracker = tracker or _NullTracker()
        if run.resumed_from:
            tracker.log_metrics({"resume/from_step": run.resumed_from}, step=run.resumed_from)
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
                if not _all_ranks_true(batch is not None):
                    break
                _maybe_fail(cfg, run.rank, p.step + 1)
                cond = run.teacher.encode_prompts(batch)  # text encoding here: see pipelines/data.py
                metrics = vsd_step(run.distiller, cond, run.updaters["student"], run.updaters["fake"], run.generator)
                p.step += 1
                p.batches_in_epoch += 1
                p.prompts_seen += t.global_batch
                now = time.perf_counter()
                step_s, t_last = now - t_last, now
                bar.update(1)
                if p.step % t.log_every == 0:
                    bad = run.bad_counts(stream)
                    tracker.log_metrics({
                        **{f"vsd/{k}": v for k, v in metrics.items()},
                        "perf/step_seconds": step_s, "perf/prompts_per_second": t.global_batch / step_s,
                        "progress/epoch": epoch, "progress/prompts_seen": p.prompts_seen,
                        **{f"data/bad_{k}": v for k, v in bad.items()},
                    }, step=p.step)
                if cfg.tracking.sample_every and p.step % cfg.tracking.sample_every == 0:
                    run.samples(tracker, p.step)
                done = bool(max_steps) and p.step >= max_steps
                if t.checkpoint_every and p.step % t.checkpoint_every == 0 and not done:
                    run.checkpoint(metrics, stream)
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
