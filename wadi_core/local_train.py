"""Single-process distillation loop (no Ray): prompts -> vsd_step -> samples, state, export."""

from __future__ import annotations

import itertools
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from wadi_core.config import to_flat_dict
from wadi_core.domain import train_prompts
from wadi_core.export import export_one_step_pipeline
from wadi_core.images import save_image_grid
from wadi_core.models.teacher import Teacher, load_teacher
from wadi_core.vsd.bookkeeping import StepBookkeeper, ema_applied, every
from wadi_core.vsd.config import VSDConfig
from wadi_core.vsd.distiller import WaDiDistiller
from wadi_core.vsd.ema import AdapterEMA
from wadi_core.vsd.state import TrainState, capture_train_state, restore_train_state
from wadi_core.vsd.step import NonFiniteGuard, make_updaters, vsd_step

__all__ = ["LocalTrainConfig", "prompt_stream", "train_local"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LocalTrainConfig:
    """The single-process run around a :class:`VSDConfig`."""

    teacher: str = "embedded"          # "embedded", a diffusers dir, an s3:// prefix or a hub id
    vsd: VSDConfig = field(default_factory=VSDConfig)
    steps: int = 1000                  # VSD steps (one student update + vsd.fake_steps_per_gen fake-score updates each)
    batch_size: int = 32               # prompts per VSD step
    seed: int = 0                      # seed of the noise, the prompt order and the sample grids' prompts and noise
    prompts: str = "domain"            # "domain" (embedded generator) or a text file, one prompt a line
    sample_every: int = 250            # PNG grid of student samples every N steps (0: at the end only)
    save_every: int = 0                # TrainState for resume every N steps (0: at the end only)
    num_sample_prompts: int = 8        # prompts (images) in each sample grid
    out_dir: str = "outputs/distill_local"  # metrics.jsonl, samples/, state/ (resumed from) and export/
    device: str = "cpu"                # torch device of the teacher, the adapters and the training ("cpu", "cuda:0")
    teacher_dtype: str = "float32"     # dtype of the frozen teacher weights: float32, bfloat16 or float16
    max_minutes: float = 0.0           # > 0: stop (and export) once training has run this long
    max_nonfinite_in_a_row: int = 5    # this many skipped non-finite steps in a row stop the run (0: never)
    export_live: bool = False          # with vsd.student_ema: also export the live (non-averaged) student

    def __post_init__(self) -> None:
        if self.max_nonfinite_in_a_row < 0:
            raise ValueError(f"max_nonfinite_in_a_row must be >= 0 (0: never stop), "
                             f"got {self.max_nonfinite_in_a_row}")
        if self.teacher_dtype not in _DTYPES:
            raise ValueError(f"teacher_dtype must be one of {sorted(_DTYPES)}, got {self.teacher_dtype!r}")
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"need steps >= 0 and batch_size >= 1, got {self.steps}, {self.batch_size}")


def prompt_stream(source: str, seed: int) -> Iterator[str]:
    """Endless prompts: the embedded domain's generator, or a text file reshuffled every epoch."""
    if source == "domain":
        yield from train_prompts(seed)
        return
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"prompt source {source!r}: use 'domain' or a text file with one prompt per line")
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{path} holds no prompts")
    rng = random.Random(seed)
    for _ in itertools.count():
        order = lines[:]
        rng.shuffle(order)
        yield from order


def train_local(cfg: LocalTrainConfig, teacher: Teacher | None = None, progress: bool = True,
                on_metrics: Callable[[int, dict[str, float]], None] | None = None,
                export: bool = True) -> dict[str, Any]:
    """Distil ``cfg.teacher`` for ``cfg.steps`` VSD steps; resumes from ``out_dir/state`` if present.

    Writes ``metrics.jsonl``, ``samples/step_*.png``, ``state/`` (TrainState) and ``export/``
    (merged one-step pipeline). Returns the last metrics plus paths and timings.
    """
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    teacher = teacher or load_teacher(cfg.teacher, dtype=_DTYPES[cfg.teacher_dtype], device=cfg.device)
    distiller = WaDiDistiller(teacher, cfg.vsd)
    updaters = make_updaters(distiller)
    gen_device = "cuda" if str(cfg.device).startswith("cuda") else "cpu"
    generator = torch.Generator(device=gen_device).manual_seed(cfg.seed)
    run_state = TrainState()  # where the run is: step, prompts consumed (data_position = prompts_seen), skipped steps
    ema = AdapterEMA(distiller.parameters("student"), cfg.vsd.student_ema) if cfg.vsd.student_ema else None
    if TrainState.exists(out / "state"):
        state = TrainState.load(out / "state")
        restore_train_state(state, distiller, updaters, generator)
        run_state = TrainState(step=state.step, data_position=state.data_position, prompts_seen=state.data_position,
                               nonfinite_steps=state.nonfinite_steps)
        if ema is not None and "student_ema" in state.optimizers:
            ema.load_state_dict(state.optimizers["student_ema"])
    bookkeeper = StepBookkeeper(NonFiniteGuard(cfg.max_nonfinite_in_a_row, total=run_state.nonfinite_steps), ema)
    prompts = prompt_stream(cfg.prompts, cfg.seed)
    for _ in range(run_state.data_position):  # replay the prompt stream to the saved position
        next(prompts)
    (out / "config.json").write_text(json.dumps(to_flat_dict(cfg), indent=2))

    # Fixed prompts and noise for the sample grids, so grids of different steps compare.
    sample_prompts = list(itertools.islice(prompt_stream(cfg.prompts, cfg.seed + 1), cfg.num_sample_prompts))
    sample_z = torch.randn(len(sample_prompts), *teacher.latent_shape,
                           generator=torch.Generator().manual_seed(cfg.seed + 1))

    def save_samples(at: int) -> Path:
        with ema_applied(ema):
            images = distiller.sample(sample_prompts, z=sample_z)
        return save_image_grid([images], out / "samples" / f"step_{at:06d}.png")

    def save_state(at: int) -> None:
        state = capture_train_state(distiller, updaters, generator, at, run_state.data_position,
                                    meta={"config": to_flat_dict(cfg)})
        state.nonfinite_steps, state.prompts_seen = run_state.nonfinite_steps, run_state.prompts_seen
        if ema is not None:
            state.optimizers["student_ema"] = ema.state_dict()
        state.save(out / "state")

    metrics: dict[str, float] = {}
    t0 = time.perf_counter()
    start = run_state.step
    with open(out / "metrics.jsonl", "a") as log, tqdm(total=cfg.steps, initial=start, disable=not progress,
                                                        desc="vsd", dynamic_ncols=True) as bar:
        while run_state.step < cfg.steps:
            if cfg.max_minutes and time.perf_counter() - t0 > 60 * cfg.max_minutes:
                break  # wall-clock budget spent: stop here, still save state and export
            batch = [next(prompts) for _ in range(cfg.batch_size)]
            cond = teacher.encode_train_prompts(batch)
            metrics = vsd_step(distiller, cond, updaters["student"], updaters["fake"], generator)
            # raises NonFiniteTraining after too many skipped steps in a row
            bookkeeper.after_step(run_state, metrics, consumed=cfg.batch_size, prompts=cfg.batch_size)
            step = run_state.step
            metrics["nonfinite_steps"] = run_state.nonfinite_steps
            log.write(json.dumps({"step": step, **metrics}) + "\n")
            bar.update(1)
            bar.set_postfix(fake=f"{metrics['loss_fake']:.4f}", g=f"{metrics['g_abs_mean']:.2e}",
                            gn=f"{metrics['grad_norm_student']:.2e}")
            if on_metrics:
                on_metrics(step, metrics)
            if every(cfg.sample_every, step):
                save_samples(step)
            if every(cfg.save_every, step):
                save_state(step)
    elapsed = time.perf_counter() - t0
    step = run_state.step
    result: dict[str, Any] = {**metrics, "step": step, "train_seconds": elapsed,
                              "seconds_per_step": elapsed / max(step - start, 1)}
    result["samples"] = str(save_samples(step))
    save_state(step)
    result["state"] = str(out / "state")
    if export:
        with ema_applied(ema):  # the product is the averaged student when vsd.student_ema is on
            result["export"] = str(export_one_step_pipeline(distiller, out / "export"))
        if ema is not None and cfg.export_live:
            result["export_live"] = str(export_one_step_pipeline(distiller, out / "export_live"))
    result["distiller"] = distiller
    return result
