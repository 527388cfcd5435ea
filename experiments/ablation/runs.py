"""One run of the ablation: train a student with train_local and score it; the baselines; the
swap students of a full fine-tune. Used inline or inside worker processes by ``runner``."""

from __future__ import annotations

import copy
import csv
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from wadi_core.adapters import adapter_state_dict, count_trainable, save_adapter_file
from wadi_core.analysis.plots import plot_histograms, plot_layer_scatter, plot_svd_energy
from wadi_core.domain.evaluator import load_domain_evaluator
from wadi_core.domain.quality import real_features
from wadi_core.local_train import LocalTrainConfig, train_local
from wadi_core.models import load_teacher
from wadi_core.vsd.state import TrainState

from experiments.ablation.config import AblationConfig
from experiments.ablation.evaluate import DomainEval, cached_real, teacher_images, teacher_pipeline
from experiments.ablation.weights import compare_student, swapped_full_state, use_student_state

__all__ = ["RunSpec", "AblationContext", "train_and_score", "score_baselines"]

Row = dict[str, Any]


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


class AblationContext:
    """Evaluator, real statistics, the teacher and the validation / test evaluation sets (built once
    per process)."""

    def __init__(self, cfg: AblationConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.evaluator = load_domain_evaluator()
        b = cfg.budget
        self.real = cached_real(self.evaluator, b.real_images, cfg.real_seed, self.out)
        # Loaded once; every run distils a deep copy (adapters are added in place).
        self.teacher = load_teacher(cfg.teacher)
        self.latent_shape, self.family = self.teacher.latent_shape, self.teacher.family
        self.val = DomainEval.build(self.evaluator, self.real, b.sweep_eval_images, cfg.val_prompt_seed,
                                    cfg.val_noise_seed, self.latent_shape)
        self.test = DomainEval.build(self.evaluator, self.real, b.eval_images, cfg.test_prompt_seed,
                                     cfg.test_noise_seed, self.latent_shape)


def _safe_score(ev: DomainEval, images: torch.Tensor) -> dict[str, float]:
    if not torch.isfinite(images).all():  # a diverged student: no FID, but the run is still a row
        return {"fid": math.nan, "precision": math.nan, "recall": math.nan, "alignment": math.nan,
                "all_correct": math.nan, "diverged": 1.0}
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
    """The FID floor (real vs real renders) and the teacher on the test set: K steps with CFG, 1 step
    with CFG, and 1 step without CFG, which is the student at initialisation (LoRaD starts at zero
    angles, and for a v-prediction teacher the student's x0 is the plain 1-step DDIM image)."""
    cfg, b, ev = ctx.cfg, ctx.cfg.budget, ctx.test
    rows: list[Row] = []
    if "real_floor" not in done:
        # The FID floor at this sample size: fresh real renders (other seed) against the reference.
        fresh = real_features(ctx.evaluator, n=len(ev), split="train", seed=cfg.real_seed + 1)
        rows.append({"name": "real_floor", "group": "baseline", "variant": "real", "kind": "real renders",
                     **ctx.real.score(fresh), "alignment": math.nan})
    pipe = None
    for steps, guidance in ((b.teacher_steps, b.teacher_guidance), (1, b.teacher_guidance), (1, 1.0)):
        name = f"teacher_{steps}step_cfg{guidance:g}"
        if name in done:
            continue
        pipe = pipe or teacher_pipeline(cfg.teacher)
        t0 = time.perf_counter()
        images = teacher_images(pipe, ev, steps, guidance)
        init = guidance == 1.0
        rows.append({"name": name, "group": "baseline", "variant": f"teacher_{steps}step" + ("_init" if init else ""),
                     "kind": (f"teacher {steps}-step, no CFG (the student at init)" if init else
                              f"teacher {steps}-step CFG {guidance:g}"), "steps": steps,
                     "sample_s": time.perf_counter() - t0, **_safe_score(ev, images)})
    return rows


def train_and_score(ctx: AblationContext, spec: RunSpec, group: str, done: frozenset[str],
                    progress: bool = True) -> list[Row]:
    """Train (or resume) and score one run; a full fine-tune on the test set also yields its
    swap-norm / swap-direction rows. Rows whose name is in ``done`` are not produced again."""
    cfg, b = ctx.cfg, ctx.cfg.budget
    want_swaps = spec.kind == "full" and spec.evalset == "test" and cfg.swaps
    if spec.name in done and (not want_swaps or f"swap_direction_of_{spec.name}" in done):
        return []
    run_dir = ctx.out / "runs" / spec.name
    if run_dir.exists() and not TrainState.exists(run_dir / "state"):
        shutil.rmtree(run_dir)  # cut off before its final state: start it again cleanly
    local = LocalTrainConfig(teacher=cfg.teacher, vsd=cfg.student_vsd(spec.kind, spec.rank, spec.lr),
                             steps=spec.steps, batch_size=b.batch_size, seed=spec.seed, prompts="domain",
                             sample_every=0, save_every=0, out_dir=str(run_dir))
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


