"""The claims ablation: adapters, LoRaD ranks, weight directions and swap students.

An application of the library (``wadi_core``); ``jobs/ablate.py`` adds argparse and MLflow. See docs/ABLATION.md.
"""

from experiments.ablation.config import BUDGETS, AblationBudget, AblationConfig, recipe_vsd
from experiments.ablation.evaluate import DomainEval, cached_real, teacher_images, teacher_pipeline
from experiments.ablation.report import PLOTS, SUMMARY_COLUMNS, Aggregate, summarize, verdicts, write_report
from experiments.ablation.runner import AblationContext, RunSpec, choose_lr, load_rows, run_ablation
from experiments.ablation.weights import adapted_weights, compare_student, swapped_full_state, use_student_state

__all__ = [
    "BUDGETS", "AblationBudget", "AblationConfig", "recipe_vsd", "DomainEval", "cached_real",
    "teacher_images", "teacher_pipeline", "PLOTS", "SUMMARY_COLUMNS", "Aggregate", "summarize", "verdicts",
    "write_report", "AblationContext", "RunSpec", "choose_lr", "load_rows", "run_ablation", "adapted_weights",
    "compare_student", "swapped_full_state", "use_student_state",
]
