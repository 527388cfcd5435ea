"""The claims ablation (issue 8): adapters, LoRaD ranks, weight directions and swap students.

Pure PyTorch; ``jobs/ablate.py`` adds argparse and MLflow. See docs/ABLATION.md.
"""

from wadi_core.ablation.config import BUDGETS, AblationBudget, AblationConfig, default_vsd
from wadi_core.ablation.evaluate import DomainEval, cached_real_stats, teacher_images, teacher_pipeline
from wadi_core.ablation.report import PLOTS, SUMMARY_COLUMNS, Aggregate, summarize, verdicts, write_report
from wadi_core.ablation.runner import AblationContext, RunSpec, choose_lr, load_rows, run_ablation
from wadi_core.ablation.weights import adapted_weights, compare_student, swapped_full_state, use_student_state

__all__ = [
    "BUDGETS", "AblationBudget", "AblationConfig", "default_vsd", "DomainEval", "cached_real_stats",
    "teacher_images", "teacher_pipeline", "PLOTS", "SUMMARY_COLUMNS", "Aggregate", "summarize", "verdicts",
    "write_report", "AblationContext", "RunSpec", "choose_lr", "load_rows", "run_ablation", "adapted_weights",
    "compare_student", "swapped_full_state", "use_student_state",
]
