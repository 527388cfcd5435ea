"""Run the ablation: baselines, per-adapter learning-rate sweep, adapter comparison with swap
students, LoRaD rank sweep. Rows are appended to ``results.jsonl`` as each run finishes, so a
cut-off job leaves a table and a rerun with the same ``out_dir`` continues where it stopped.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from wadi_core.ablation.config import AblationConfig
from wadi_core.ablation.evaluate import DomainEval, cached_real_stats, teacher_images, teacher_pipeline
from wadi_core.ablation.weights import compare_student, swapped_full_state, use_student_state
from wadi_core.config import to_flat_dict

__all__ = ["RunSpec", "AblationContext", "run_ablation", "choose_lr", "load_rows"]

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
    """Evaluator, real statistics and the validation / test evaluation sets (built once)."""

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


class _Runner:
    def __init__(self, cfg: AblationConfig, ctx: AblationContext, on_row: OnRow | None, progress: bool) -> None:
        self.cfg, self.ctx, self.on_row, self.progress = cfg, ctx, on_row, progress
        self.out = Path(cfg.out_dir)
        self.rows = load_rows(self.out)
        self.done = {r["name"] for r in self.rows}

    def emit(self, row: Row) -> None:
        self.rows.append(row)
        self.done.add(row["name"])
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.on_row is not None:
            self.on_row(row, self.cfg)

    # -- baselines ------------------------------------------------------------------------------
    def baselines(self) -> None:
        from wadi_core.domain.quality import real_feature_stats
        from wadi_core.metrics import frechet_distance

        b, ev = self.cfg.budget, self.ctx.test
        if "real_floor" not in self.done:
            # The FID floor at this sample size: fresh real renders (other seed) against the reference.
            real = real_feature_stats(self.ctx.evaluator, n=len(ev), split="train", seed=self.cfg.real_seed + 1)
            self.emit({"name": "real_floor", "group": "baseline", "variant": "real", "kind": "real renders",
                       "fid": float(frechet_distance(real, self.ctx.real)), "alignment": math.nan})
        pipe = None
        for steps in (b.teacher_steps, 1):
            name = f"teacher_{steps}step_cfg{b.teacher_guidance:g}"
            if name in self.done:
                continue
            pipe = pipe or teacher_pipeline(self.cfg.teacher)
            t0 = time.perf_counter()
            images = teacher_images(pipe, ev, steps, b.teacher_guidance)
            self.emit({"name": name, "group": "baseline", "variant": f"teacher_{steps}step",
                       "kind": f"teacher {steps}-step CFG {b.teacher_guidance:g}", "steps": steps,
                       "sample_s": time.perf_counter() - t0, **_safe_score(ev, images)})

    # -- one distillation run -------------------------------------------------------------------
    def train(self, spec: RunSpec, group: str) -> Row | None:
        """Train (or resume) and score one run; full fine-tunes on the test set also get the swaps."""
        want_swaps = spec.kind == "full" and spec.evalset == "test" and self.cfg.swaps
        swaps_done = f"swap_direction_of_{spec.name}" in self.done
        if spec.name in self.done and (not want_swaps or swaps_done):
            return None
        from wadi_core.adapters import count_trainable
        from wadi_core.vsd.train import LocalTrainConfig, train_local

        b = self.cfg.budget
        run_dir = self.out / "runs" / spec.name
        local = LocalTrainConfig(teacher=self.cfg.teacher, vsd=self.cfg.student_vsd(spec.kind, spec.rank, spec.lr),
                                 steps=spec.steps, batch_size=b.batch_size, seed=spec.seed, prompts="domain",
                                 sample_every=0, save_every=0, out_dir=str(run_dir))
        timer = _StepTimer()
        t0 = time.perf_counter()
        # A finished run resumes from its final TrainState without training (e.g. to redo the swaps).
        result = train_local(local, teacher=copy.deepcopy(self.ctx.teacher), progress=self.progress,
                             on_metrics=timer, export=False)
        train_s = time.perf_counter() - t0
        distiller = result.pop("distiller")
        den = distiller.denoiser
        row: Row | None = None
        cmp = compare_student(den, svd_fraction=0.3 if spec.kind == "full" else None) if spec.evalset == "test" else None
        if spec.name not in self.done:
            wall, cpu = timer.per_step()
            ev = self.ctx.val if spec.evalset == "val" else self.ctx.test
            row = {"name": spec.name, "group": group, "variant": "student", **asdict(spec),
                   "batch_size": b.batch_size, "params": count_trainable(den, "student"),
                   "s_per_step": wall, "cpu_s_per_step": cpu, "train_s": train_s,
                   **{k: float(result[k]) for k in ("loss_fake", "g_abs_mean", "grad_norm_student", "x0_std")
                      if k in result}}
            row.update(_safe_score(ev, ev.student_images(distiller)))
            if cmp is not None:
                row.update(_weight_summary(cmp))
            self.emit(row)
        diverged = next(r for r in self.rows if r["name"] == spec.name)["diverged"] == 1.0
        if want_swaps and not diverged:
            self.swaps(spec, distiller, cmp)
        return row

    def swaps(self, spec: RunSpec, distiller: Any, cmp: Any) -> None:
        """Weight analysis files and the swap-norm / swap-direction students of a full fine-tune."""
        from wadi_core.adapters import adapter_state_dict
        from wadi_core.analysis.plots import plot_histograms, plot_layer_scatter, plot_svd_energy
        from wadi_core.export import save_adapter_file

        den, ev = distiller.denoiser, self.ctx.test
        wdir = self.out / "weights" / spec.name
        wdir.mkdir(parents=True, exist_ok=True)
        rows = cmp.per_layer_rows()
        import csv

        with open(wdir / "per_layer.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        plot_layer_scatter(cmp, wdir / "layer_scatter.png",
                           title=f"full fine-tune vs teacher ({spec.steps} steps, seed {spec.seed})")
        if spec.seed == self.cfg.seeds[0]:  # histograms of one seed are enough (and plots are slow)
            plot_histograms(cmp, wdir / "histograms.png")
            plot_svd_energy(cmp, wdir / "svd_energy.png")
        spec_full = distiller.cfg.student
        save_adapter_file(wdir / "student_full.safetensors", adapter_state_dict(den, "student"), spec_full,
                          self.ctx.family)
        for what in ("norm", "direction"):
            state = swapped_full_state(den, what)
            save_adapter_file(wdir / f"swap_{what}.safetensors", state, spec_full, self.ctx.family)
            with use_student_state(den, state):
                scores = _safe_score(ev, ev.student_images(distiller))
                swapped = _weight_summary(compare_student(den))
            self.emit({"name": f"swap_{what}_of_{spec.name}", "group": "swap", "variant": f"swap_{what}",
                       "kind": "full", "rank": spec.rank, "lr": spec.lr, "seed": spec.seed, "steps": spec.steps,
                       "evalset": "test", "source": spec.name, "checkpoint": str(wdir / f"swap_{what}.safetensors"),
                       **scores, **swapped})

    # -- the plan -------------------------------------------------------------------------------
    def lr_sweep(self, kind: str) -> float:
        cfg, b = self.cfg, self.cfg.budget
        fixed = dict(cfg.fixed_lrs)
        if kind in fixed:
            return float(fixed[kind])
        grid = sorted(cfg.lr_grid)
        for lr in grid:
            self.train(RunSpec(kind, cfg.rank, lr, cfg.sweep_seed, b.sweep_steps, "val"), "lr_sweep")
        for _ in range(cfg.lr_extend):
            best = choose_lr(self.rows, kind)
            tried = sorted({r["lr"] for r in self.rows if r["group"] == "lr_sweep" and r["kind"] == kind})
            if best == tried[0]:
                new = best / cfg.lr_factor
            elif best == tried[-1]:
                new = best * cfg.lr_factor
            else:
                break
            self.train(RunSpec(kind, cfg.rank, new, cfg.sweep_seed, b.sweep_steps, "val"), "lr_sweep")
        return float(choose_lr(self.rows, kind))

    def run(self) -> dict[str, float]:
        from tqdm.auto import tqdm

        cfg, b = self.cfg, self.cfg.budget
        self.baselines()
        lrs = {kind: self.lr_sweep(kind) for kind in dict.fromkeys((*cfg.kinds, "lorad"))}
        (self.out / "lr_choice.json").write_text(json.dumps(lrs, indent=1))
        plan: list[tuple[RunSpec, str]] = []
        for seed in cfg.seeds:  # seeds outer: a cut-off run still has every kind once
            plan += [(RunSpec(k, cfg.rank, lrs[k], seed, b.steps, "test"), "adapter") for k in cfg.kinds]
        for seed in cfg.seeds:
            plan += [(RunSpec("lorad", r, lrs["lorad"], seed, b.steps, "test"), "rank")
                     for r in cfg.ranks if not (r == cfg.rank and "lorad" in cfg.kinds)]
        for spec, group in tqdm(plan, desc="ablation runs", disable=not self.progress, dynamic_ncols=True):
            self.train(spec, group)
        return lrs


def run_ablation(cfg: AblationConfig, on_row: OnRow | None = None, progress: bool = True) -> list[Row]:
    """Run (or continue) the whole ablation in ``cfg.out_dir``; returns all result rows.

    ``on_row(row, cfg)`` is called after each row is written (e.g. to refresh the report and
    log to MLflow). Refuses to continue an ``out_dir`` written with another configuration.
    """
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    flat = {k: v for k, v in to_flat_dict(cfg).items() if k not in ("out_dir", "threads")}
    cfg_file = out / "config.json"
    if cfg_file.exists():
        old = json.loads(cfg_file.read_text())
        if old != json.loads(json.dumps(flat)):
            diff = sorted(k for k in set(old) | set(flat) if old.get(k) != json.loads(json.dumps(flat)).get(k))
            raise ValueError(f"{out} holds an ablation with another configuration (differs in {diff[:6]}); "
                             "use another --out or delete that directory")
    else:
        cfg_file.write_text(json.dumps(flat, indent=1))
    runner = _Runner(cfg, AblationContext(cfg), on_row, progress)
    runner.run()
    return runner.rows
