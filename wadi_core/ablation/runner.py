"""Run the ablation: baselines, per-adapter learning-rate sweep, adapter comparison with swap
students, LoRaD rank sweep. Rows are appended to ``results.jsonl`` as each run finishes, so a
cut-off job leaves a table and a rerun with the same ``out_dir`` continues where it stopped.

Independent runs can go to ``cfg.workers`` single-threaded processes: on a shared 2-core machine
two 1-thread processes were ~10x faster than one process with 2 OpenMP threads (which spin
while waiting for each other under load; ../shared/spec/STACK.md). Results do not depend on
the number of workers: every run is seeded and scored on fixed prompts and noise.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from wadi_core.ablation.config import AblationConfig
from wadi_core.ablation.evaluate import DomainEval, cached_real_stats, teacher_images, teacher_pipeline
from wadi_core.ablation.weights import compare_student, swapped_full_state, use_student_state
from wadi_core.config import to_flat_dict

__all__ = ["RunSpec", "AblationContext", "run_ablation", "choose_lr", "load_rows", "train_and_score",
           "score_baselines"]

Row = dict[str, Any]
OnRow = Callable[[Row, AblationConfig], None]


@dataclass(frozen=True)
class RunSpec:
    """One distillation run: the student adapter, its learning rate, the seed and the step budget."""

    kind: str
    rank: int
    lr: float
    seed: int
    steps: int
    evalset: str  # "val" (learning-rate sweep) or "test" (reported numbers)

    @property
    def name(self) -> str:
        rank = "" if self.kind == "full" else f"_r{self.rank}"
        return f"{self.kind}{rank}_lr{self.lr:.3g}_seed{self.seed}_{self.steps}steps_{self.evalset}"


class _StepTimer:
    """``on_metrics`` callback of train_local: wall and process-CPU seconds per step."""

    def __init__(self) -> None:
        self.first: tuple[int, float, float] | None = None
        self.last: tuple[int, float, float] | None = None

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        now = (step, time.perf_counter(), time.process_time())
        if self.first is None:
            self.first = now
        self.last = now

    def per_step(self) -> tuple[float, float]:
        # From the first callback on: the first step's one-off costs (allocations) are excluded.
        if self.first is None or self.last is None or self.last[0] == self.first[0]:
            return math.nan, math.nan
        n = self.last[0] - self.first[0]
        return (self.last[1] - self.first[1]) / n, (self.last[2] - self.first[2]) / n


def load_rows(out_dir: str | Path) -> list[Row]:
    """Rows written so far (``results.jsonl``)."""
    path = Path(out_dir) / "results.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def choose_lr(rows: list[Row], kind: str) -> float | None:
    """The sweep learning rate with the lowest validation FID for ``kind`` (diverged runs lose)."""
    cands = [r for r in rows if r["group"] == "lr_sweep" and r["kind"] == kind and r["variant"] == "student"]
    if not cands:
        return None
    return min(cands, key=lambda r: (r["fid"] if math.isfinite(r["fid"]) else math.inf, r["lr"]))["lr"]


class AblationContext:
    """Evaluator, real statistics, the teacher and the validation / test evaluation sets (built once
    per process)."""

    def __init__(self, cfg: AblationConfig) -> None:
        from wadi_core.domain.evaluator import load_domain_evaluator
        from wadi_core.models import load_teacher

        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.evaluator = load_domain_evaluator()
        b = cfg.budget
        self.real = cached_real_stats(self.evaluator, b.real_images, cfg.real_seed, self.out)
        # Loaded once; every run distils a deep copy (adapters are added in place).
        self.teacher = load_teacher(cfg.teacher)
        self.latent_shape, self.family = self.teacher.latent_shape, self.teacher.family
        self.val = DomainEval.build(self.evaluator, self.real, b.sweep_eval_images, cfg.val_prompt_seed,
                                    cfg.val_noise_seed, self.latent_shape)
        self.test = DomainEval.build(self.evaluator, self.real, b.eval_images, cfg.test_prompt_seed,
                                     cfg.test_noise_seed, self.latent_shape)


def _safe_score(ev: DomainEval, images: torch.Tensor) -> dict[str, float]:
    if not torch.isfinite(images).all():  # a diverged student: no FID, but the run is still a row
        return {"fid": math.nan, "alignment": math.nan, "all_correct": math.nan, "diverged": 1.0}
    return {**ev.score(images), "diverged": 0.0}


def _weight_summary(cmp: Any) -> dict[str, float]:
    s = cmp.summary()
    out = {"dir_change_pct": s["direction_change_mean_pct"], "dir_change_std_pct": s["direction_change_std_pct"],
           "norm_change_pct": s["norm_change_mean_pct"], "norm_change_std_pct": s["norm_change_std_pct"],
           "dir_norm_ratio": s["direction_to_norm_ratio"], "layers": s["layers"]}
    if "svd_energy_kept_mean" in s:
        out["svd_energy_30pct"] = s["svd_energy_kept_mean"]
    return out


def score_baselines(ctx: AblationContext, done: frozenset[str]) -> list[Row]:
    """The FID floor (real vs real renders) and the teacher (K-step and 1-step CFG) on the test set."""
    from wadi_core.domain.quality import real_feature_stats
    from wadi_core.metrics import frechet_distance

    cfg, b, ev = ctx.cfg, ctx.cfg.budget, ctx.test
    rows: list[Row] = []
    if "real_floor" not in done:
        # The FID floor at this sample size: fresh real renders (other seed) against the reference.
        real = real_feature_stats(ctx.evaluator, n=len(ev), split="train", seed=cfg.real_seed + 1)
        rows.append({"name": "real_floor", "group": "baseline", "variant": "real", "kind": "real renders",
                     "fid": float(frechet_distance(real, ctx.real)), "alignment": math.nan})
    pipe = None
    for steps in (b.teacher_steps, 1):
        name = f"teacher_{steps}step_cfg{b.teacher_guidance:g}"
        if name in done:
            continue
        pipe = pipe or teacher_pipeline(cfg.teacher)
        t0 = time.perf_counter()
        images = teacher_images(pipe, ev, steps, b.teacher_guidance)
        rows.append({"name": name, "group": "baseline", "variant": f"teacher_{steps}step",
                     "kind": f"teacher {steps}-step CFG {b.teacher_guidance:g}", "steps": steps,
                     "sample_s": time.perf_counter() - t0, **_safe_score(ev, images)})
    return rows


def train_and_score(ctx: AblationContext, spec: RunSpec, group: str, done: frozenset[str],
                    progress: bool = True) -> list[Row]:
    """Train (or resume) and score one run; a full fine-tune on the test set also yields its
    swap-norm / swap-direction rows. Rows whose name is in ``done`` are not produced again."""
    from wadi_core.adapters import count_trainable
    from wadi_core.vsd.train import LocalTrainConfig, train_local

    cfg, b = ctx.cfg, ctx.cfg.budget
    want_swaps = spec.kind == "full" and spec.evalset == "test" and cfg.swaps
    if spec.name in done and (not want_swaps or f"swap_direction_of_{spec.name}" in done):
        return []
    local = LocalTrainConfig(teacher=cfg.teacher, vsd=cfg.student_vsd(spec.kind, spec.rank, spec.lr),
                             steps=spec.steps, batch_size=b.batch_size, seed=spec.seed, prompts="domain",
                             sample_every=0, save_every=0, out_dir=str(ctx.out / "runs" / spec.name))
    timer = _StepTimer()
    t0 = time.perf_counter()
    # A finished run resumes from its final TrainState without training (e.g. to redo the swaps).
    result = train_local(local, teacher=copy.deepcopy(ctx.teacher), progress=progress, on_metrics=timer,
                         export=False)
    train_s = time.perf_counter() - t0
    distiller = result.pop("distiller")
    den = distiller.denoiser
    rows: list[Row] = []
    cmp = compare_student(den, svd_fraction=0.3 if spec.kind == "full" else None) if spec.evalset == "test" else None
    diverged = False
    if spec.name not in done:
        wall, cpu = timer.per_step()
        ev = ctx.val if spec.evalset == "val" else ctx.test
        row: Row = {"name": spec.name, "group": group, "variant": "student", **asdict(spec),
                    "batch_size": b.batch_size, "params": count_trainable(den, "student"),
                    "s_per_step": wall, "cpu_s_per_step": cpu, "train_s": train_s,
                    **{k: float(result[k]) for k in ("loss_fake", "g_abs_mean", "grad_norm_student", "x0_std")
                       if k in result}}
        row.update(_safe_score(ev, ev.student_images(distiller)))
        if cmp is not None:
            row.update(_weight_summary(cmp))
        rows.append(row)
        diverged = row["diverged"] == 1.0
    if want_swaps and not diverged:
        rows += _swap_rows(ctx, spec, distiller, cmp)
    return rows


def _swap_rows(ctx: AblationContext, spec: RunSpec, distiller: Any, cmp: Any) -> list[Row]:
    """Weight-analysis files and the swap-norm / swap-direction students of a full fine-tune."""
    from wadi_core.adapters import adapter_state_dict
    from wadi_core.analysis.plots import plot_histograms, plot_layer_scatter, plot_svd_energy
    from wadi_core.export import save_adapter_file

    den, ev = distiller.denoiser, ctx.test
    wdir = ctx.out / "weights" / spec.name
    wdir.mkdir(parents=True, exist_ok=True)
    per_layer = cmp.per_layer_rows()
    with open(wdir / "per_layer.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(per_layer[0]))
        writer.writeheader()
        writer.writerows(per_layer)
    plot_layer_scatter(cmp, wdir / "layer_scatter.png",
                       title=f"full fine-tune vs teacher ({spec.steps} steps, seed {spec.seed})")
    if spec.seed == ctx.cfg.seeds[0]:  # histograms of one seed are enough (and plots are slow)
        plot_histograms(cmp, wdir / "histograms.png")
        plot_svd_energy(cmp, wdir / "svd_energy.png")
    spec_full = distiller.cfg.student
    save_adapter_file(wdir / "student_full.safetensors", adapter_state_dict(den, "student"), spec_full, ctx.family)
    rows = []
    for what in ("norm", "direction"):
        state = swapped_full_state(den, what)
        ckpt = wdir / f"swap_{what}.safetensors"
        save_adapter_file(ckpt, state, spec_full, ctx.family)
        with use_student_state(den, state):
            scores = _safe_score(ev, ev.student_images(distiller))
            swapped = _weight_summary(compare_student(den))
        rows.append({"name": f"swap_{what}_of_{spec.name}", "group": "swap", "variant": f"swap_{what}",
                     "kind": "full", "rank": spec.rank, "lr": spec.lr, "seed": spec.seed, "steps": spec.steps,
                     "evalset": "test", "source": spec.name, "checkpoint": str(ckpt), **scores, **swapped})
    return rows


# -- worker processes (one context per process, built by the pool initializer) -------------------
_WORKER_CONTEXT: list[AblationContext] = []


def _init_worker(cfg: AblationConfig) -> None:
    torch.set_num_threads(max(cfg.threads, 1))
    _WORKER_CONTEXT.append(AblationContext(cfg))


def _worker_train(spec: RunSpec, group: str, done: frozenset[str]) -> list[Row]:
    return train_and_score(_WORKER_CONTEXT[0], spec, group, done, progress=False)


def _worker_baselines(done: frozenset[str]) -> list[Row]:
    return score_baselines(_WORKER_CONTEXT[0], done)


@dataclass
class _Task:
    """One entry of the ordered plan. ``what``: "baselines", "run" (a fixed spec), "ext" (maybe one
    more sweep lr for ``kind``), "main" (``kind`` at its chosen lr) or "rank" (LoRaD at ``rank``)."""

    what: str
    kind: str = ""
    seed: int = 0
    rank: int = 0
    spec: RunSpec | None = None
    group: str = ""
    round: int = 0


class _Runner:
    """Runs the plan in priority order on ``cfg.workers`` processes (or inline): a task starts as
    soon as what it needs (a kind's chosen lr) is known, so the most informative runs come first
    and a cut-off job has answered as many claims as it could."""

    def __init__(self, cfg: AblationConfig, on_row: OnRow | None, progress: bool) -> None:
        self.cfg, self.on_row, self.progress = cfg, on_row, progress
        self.out = Path(cfg.out_dir)
        self.rows = load_rows(self.out)
        self.done = {r["name"] for r in self.rows}
        self.lr: dict[str, float] = {k: float(v) for k, v in cfg.fixed_lrs}
        self.pool: ProcessPoolExecutor | None = None
        self.ctx: AblationContext | None = None
        if cfg.workers > 1:
            import multiprocessing

            self.pool = ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init_worker, initargs=(cfg,))
        else:
            self.ctx = AblationContext(cfg)

    def emit(self, row: Row) -> None:
        self.rows.append(row)
        self.done.add(row["name"])
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.on_row is not None:
            self.on_row(row, self.cfg)

    # -- the plan -----------------------------------------------------------------------------
    def _sweep_spec(self, kind: str, lr: float) -> RunSpec:
        return RunSpec(kind, self.cfg.rank, lr, self.cfg.sweep_seed, self.cfg.budget.sweep_steps, "val")

    def plan(self) -> list[_Task]:
        """Priority order: the full fine-tune (carries two claims) and LoRaD first, then the
        baselines, the other kinds, the second seed, the rank sweep."""
        cfg, b = self.cfg, self.cfg.budget
        order = sorted(dict.fromkeys((*cfg.kinds, "lorad")), key=lambda k: ["full", "lorad", "lora", "dora"].index(k)
                       if k in ("full", "lorad", "lora", "dora") else 9)
        tasks: list[_Task] = []

        def kind_tasks(kind: str) -> list[_Task]:
            out = []
            if kind not in self.lr:
                out += [_Task("run", kind, spec=self._sweep_spec(kind, lr), group="lr_sweep") for lr in sorted(cfg.lr_grid)]
                out.append(_Task("ext", kind))  # fixes the kind's lr (after extending the grid if needed)
            if kind in cfg.kinds:
                out.append(_Task("main", kind, seed=cfg.seeds[0]))
            return out

        for kind in order[:2]:
            tasks += kind_tasks(kind)
        tasks.append(_Task("baselines"))
        for kind in order[2:]:
            tasks += kind_tasks(kind)
        tasks += [_Task("main", k, seed=s) for s in cfg.seeds[1:] for k in order if k in cfg.kinds]
        tasks += [_Task("rank", "lorad", seed=s, rank=r) for s in cfg.seeds for r in cfg.ranks
                  if not (r == cfg.rank and "lorad" in cfg.kinds)]
        return tasks

    def _sweep_done(self, kind: str) -> bool:
        return all(self._sweep_spec(kind, lr).name in self.done for lr in self.cfg.lr_grid)

    def _resolve(self, task: _Task, running: set[str]) -> tuple[bool, _Task | None]:
        """(ready, concrete task or None when there is nothing to run) for ``task``."""
        cfg, b = self.cfg, self.cfg.budget
        if task.what in ("run", "baselines"):
            return True, task
        if task.what == "ext":
            if not self._sweep_done(task.kind) or any(n in running for n in self._kind_sweep_names(task.kind)):
                return False, None
            best = choose_lr(self.rows, task.kind)
            tried = sorted({r["lr"] for r in self.rows if r["group"] == "lr_sweep" and r["kind"] == task.kind})
            new = (best / cfg.lr_factor if best == tried[0] else best * cfg.lr_factor if best == tried[-1] else None)
            if new is None or task.round >= cfg.lr_extend:
                self.lr[task.kind] = float(best)
                return True, None
            ext = _Task("run", task.kind, spec=self._sweep_spec(task.kind, new), group="lr_sweep")
            return True, ext
        kind = task.kind
        if kind not in self.lr:
            return False, None
        if task.what == "main":
            return True, _Task("run", kind, spec=RunSpec(kind, cfg.rank, self.lr[kind], task.seed, b.steps, "test"),
                               group="adapter")
        return True, _Task("run", kind, spec=RunSpec(kind, task.rank, self.lr[kind], task.seed, b.steps, "test"),
                           group="rank")

    def _kind_sweep_names(self, kind: str) -> list[str]:
        return [self._sweep_spec(kind, lr).name for lr in self._tried_or_grid(kind)]

    def _tried_or_grid(self, kind: str) -> list[float]:
        tried = {r["lr"] for r in self.rows if r["group"] == "lr_sweep" and r["kind"] == kind}
        return sorted(tried | set(self.cfg.lr_grid))

    def _execute(self, task: _Task, done: frozenset[str]) -> Any:
        if self.pool is None:
            assert self.ctx is not None
            if task.what == "baselines":
                return score_baselines(self.ctx, done)
            return train_and_score(self.ctx, task.spec, task.group, done, progress=self.progress)
        if task.what == "baselines":
            return self.pool.submit(_worker_baselines, done)
        return self.pool.submit(_worker_train, task.spec, task.group, done)

    def run(self) -> dict[str, float]:
        from concurrent.futures import FIRST_COMPLETED, wait

        from tqdm.auto import tqdm

        pending = self.plan()
        in_flight: dict[Any, _Task] = {}
        ext_rounds: dict[str, int] = {}
        slots = max(self.cfg.workers, 1)
        bar = tqdm(total=len(pending), desc="ablation tasks", disable=not self.progress, dynamic_ncols=True)

        def finished(task: _Task, rows: list[Row]) -> None:
            for row in rows:
                self.emit(row)
            if task.group == "lr_sweep" and task.spec is not None and task.spec.lr not in self.cfg.lr_grid:
                # an extension run finished: maybe extend again (up to lr_extend rounds)
                ext_rounds[task.kind] = ext_rounds.get(task.kind, 0) + 1
                pending.insert(0, _Task("ext", task.kind, round=ext_rounds[task.kind]))
            bar.update(1)

        try:
            while pending or in_flight:
                started = False
                running = {t.spec.name for t in in_flight.values() if t.spec is not None}
                while len(in_flight) < slots:
                    for i, task in enumerate(pending):
                        ready, concrete = self._resolve(task, running)
                        if not ready:
                            continue
                        pending.pop(i)
                        if concrete is None or (concrete.spec is not None and concrete.spec.name in running):
                            bar.update(1)
                            started = True
                            break
                        if concrete.what == "baselines" or concrete.spec is not None:
                            done = frozenset(self.done)
                            if self.pool is None:
                                finished(concrete, self._execute(concrete, done))
                            else:
                                in_flight[self._execute(concrete, done)] = concrete
                                running.add(concrete.spec.name if concrete.spec else "baselines")
                            started = True
                            break
                    else:
                        break  # nothing ready: wait for a running task
                if not in_flight:
                    if pending and not started:
                        raise RuntimeError(f"ablation plan is stuck: {[t.what + ':' + t.kind for t in pending][:5]}")
                    continue
                complete, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
                for fut in complete:
                    finished(in_flight.pop(fut), fut.result())
        finally:
            bar.close()
            if self.pool is not None:
                self.pool.shutdown(wait=False, cancel_futures=True)
        (self.out / "lr_choice.json").write_text(json.dumps(self.lr, indent=1))
        return dict(self.lr)


def run_ablation(cfg: AblationConfig, on_row: OnRow | None = None, progress: bool = True) -> list[Row]:
    """Run (or continue) the whole ablation in ``cfg.out_dir``; returns all result rows.

    ``on_row(row, cfg)`` is called in this process after each row is written (e.g. to refresh the
    report and log to MLflow). Refuses to continue an ``out_dir`` written with another configuration.
    """
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    flat = json.loads(json.dumps({k: v for k, v in to_flat_dict(cfg).items()
                                  if k not in ("out_dir", "threads", "workers")}))
    cfg_file = out / "config.json"
    if cfg_file.exists():
        old = json.loads(cfg_file.read_text())
        if old != flat:
            diff = sorted(k for k in set(old) | set(flat) if old.get(k) != flat.get(k))
            raise ValueError(f"{out} holds an ablation with another configuration (differs in {diff[:6]}); "
                             "use another --out or delete that directory")
    else:
        cfg_file.write_text(json.dumps(flat, indent=1))
    if cfg.workers > 1:  # the workers read the cached real statistics instead of each rendering them
        from wadi_core.domain.evaluator import load_domain_evaluator

        cached_real_stats(load_domain_evaluator(), cfg.budget.real_images, cfg.real_seed, out)
    runner = _Runner(cfg, on_row, progress)
    runner.run()
    return runner.rows
