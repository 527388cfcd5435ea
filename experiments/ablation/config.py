"""Typed configuration of the claims ablation: budgets, grids, seeds."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from wadi_core.adapters import ADAPTER_KINDS, AdapterSpec, adapter_class
from wadi_core.config import from_dict
from wadi_core.domain import TEACHER_GUIDANCE, TEACHER_STEPS
from wadi_core.vsd.config import VSDConfig

from pipelines.config.cli import read_recipe

__all__ = ["AblationBudget", "AblationConfig", "BUDGETS", "recipe_vsd"]


@dataclass(frozen=True)
class AblationBudget:
    """Per-run step budgets and evaluation sizes (what makes a run fit the wall-clock budget)."""

    steps: int = 250                # VSD steps of every main / rank-sweep run
    sweep_steps: int = 80           # VSD steps of each learning-rate sweep run
    batch_size: int = 32           # prompts per VSD step of every run (sweep, main and rank runs)
    eval_images: int = 1000         # 1-step student images per FID (test prompts, eval seed)
    sweep_eval_images: int = 500    # images per FID in the learning-rate sweep (validation prompts)
    real_images: int = 5000         # real renders of the reference statistics
    teacher_steps: int = TEACHER_STEPS  # the multi-step teacher baseline
    teacher_guidance: float = TEACHER_GUIDANCE  # CFG scale of the teacher baselines with CFG (K-step and 1-step)

    def __post_init__(self) -> None:
        for name in ("steps", "sweep_steps", "batch_size", "eval_images", "sweep_eval_images", "real_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"budget.{name} must be >= 1, got {getattr(self, name)}")
        if min(self.eval_images, self.sweep_eval_images, self.real_images) < 2:
            raise ValueError("FID needs at least 2 images per set")


#: ``--budget full`` took 15 min on 2 idle CPU cores on 2026-12-05 (29 runs, ~4,700 VSD steps); ``smoke`` is the CI version.
BUDGETS: dict[str, AblationBudget] = {
    "full": AblationBudget(),
    "smoke": AblationBudget(steps=2, sweep_steps=1, batch_size=4, eval_images=24, sweep_eval_images=16,
                            real_images=64, teacher_steps=2),
}


def recipe_vsd(recipe: str = "embedded") -> VSDConfig:
    """The ``vsd`` section of a recipe (name in recipes/ or a YAML path): every ablation run uses it,
    only the student adapter (kind, rank, lr) changes. The ablation scores and analyses the live
    student weights (its runs export nothing), whatever ``student_ema`` says."""
    _, data = read_recipe(recipe)
    return from_dict(VSDConfig, data.get("vsd") or {})


@dataclass(frozen=True)
class AblationConfig:
    """What the ablation runs. Only the student adapter (kind, rank, lr) changes between runs;
    the fake score, guidance, step budget, batch and prompts are the same for every run.

    Learning rates: for each kind, the same multiplicative ``lr_grid`` is tried on ``sweep_seed``
    for ``budget.sweep_steps`` steps and the best domain FID on *validation* prompts/noise
    (``val_prompt_seed``) is kept; if the best is at an edge of the grid, the grid is extended by
    one factor on that side (at most ``lr_extend`` times). Main runs are then scored on the test
    prompts (``test_prompt_seed``, the project's domain protocol) with other noise.
    """

    teacher: str = "embedded"                  # teacher diffusers dir (local, s3://, hub id) or "embedded"
    vsd: VSDConfig = field(default_factory=recipe_vsd)
    budget: AblationBudget = field(default_factory=AblationBudget)
    kinds: tuple[str, ...] = ("lorad", "lora", "dora", "full")  # student adapter kinds compared (each at `rank`)
    rank: int = 32                              # student rank of the adapter comparison (the recipe's)
    ranks: tuple[int, ...] = (4, 8, 16, 32)     # LoRaD rank sweep (same lr as the comparison's LoRaD)
    seeds: tuple[int, ...] = (0, 1)             # training seeds of the main and rank runs (mean ± sd over them)
    lr_grid: tuple[float, ...] = (3e-4, 1e-3, 3e-3)  # student learning rates swept per kind (validation FID)
    lr_extend: int = 1                          # max times the grid grows by lr_factor past a best-at-the-edge lr
    lr_factor: float = 3.0                      # spacing used when the grid is extended
    fixed_lrs: tuple[tuple[str, float], ...] = ()  # (kind, lr) pairs that skip the sweep
    sweep_seed: int = 100                       # training seed of the lr sweep runs (not one of `seeds`)
    val_prompt_seed: int = 2                    # eval_prompts(..., seed) for the lr choice
    test_prompt_seed: int = 1                   # eval_prompts(..., seed) for every reported number
    val_noise_seed: int = 2002                  # seed of the 1-step noise of the lr choice's images
    test_noise_seed: int = 1001                 # seed of the 1-step noise of every reported number's images
    real_seed: int = 777                        # wadi_core.domain.quality.REAL_SEED
    swaps: bool = True                          # also score full fine-tunes with teacher norms / directions swapped in
    out_dir: str = "runs/ablation"              # results, runs, report and plots (a rerun continues it)
    threads: int = 0                            # torch threads per process (0: torch's default; workers: 1)
    workers: int = 1                            # processes running independent runs in parallel

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in ADAPTER_KINDS]
        if bad or not self.kinds:
            raise ValueError(f"kinds must be a non-empty subset of {sorted(ADAPTER_KINDS)}, got {self.kinds}")
        if len(self.seeds) < 1 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and non-empty, got {self.seeds}")
        if not self.lr_grid or any(lr <= 0 for lr in self.lr_grid):
            raise ValueError(f"lr_grid must hold positive learning rates, got {self.lr_grid}")
        if self.rank < 1 or any(r < 1 for r in self.ranks):
            raise ValueError("ranks must be >= 1")
        if self.val_prompt_seed == self.test_prompt_seed:
            raise ValueError("val_prompt_seed must differ from test_prompt_seed (the lr is not chosen on the test set)")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.sweep_seed in self.seeds:
            raise ValueError("sweep_seed must not be one of the main seeds")

    def student_vsd(self, kind: str, rank: int, lr: float) -> VSDConfig:
        """The shared recipe with this run's student adapter and generator learning rate."""
        rank = rank if adapter_class(kind).uses_rank else 0  # full fine-tuning has no rank
        return replace(self.vsd, student=AdapterSpec(kind, rank, self.vsd.student.targets), gen_lr=lr)
