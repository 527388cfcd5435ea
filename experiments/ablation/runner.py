"""Run the ablation: baselines, per-adapter learning-rate sweep, adapter comparison with swap
students, LoRaD rank sweep. Rows are appended to ``results.jsonl`` as each run finishes, so a
cut-off job leaves a table and a rerun with the same ``out_dir`` continues where it stopped.

Independent runs can go to ``cfg.workers`` single-threaded processes: on a shared 2-core machine
two 1-thread processes were ~10x faster than one process with 2 OpenMP threads (which spin
while waiting for each other under load). Results do not depend on
the number of workers: every run is seeded and scored on fixed prompts and noise.
"""

from __future__ import annotations

import json
import math
import multiprocessing
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from wadi_core.config import to_flat_dict
from wadi_core.domain.evaluator import load_domain_evaluator

from experiments.ablation.config import AblationConfig
from experiments.ablation.evaluate import cached_real
from experiments.ablation.runs import AblationContext, RunSpec, score_baselines, train_and_score

__all__ = ["RunSpec", "AblationContext", "run_ablation", "choose_lr", "load_rows", "train_and_score",
           "score_baselines"]

Row = dict[str, Any]
OnRow = Callable[[Row, AblationConfig], None]


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
        cfg = self.cfg
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
        cached_real(load_domain_evaluator(), cfg.budget.real_images, cfg.real_seed, out)
    runner = _Runner(cfg, on_row, progress)
    runner.run()
    return runner.rows
