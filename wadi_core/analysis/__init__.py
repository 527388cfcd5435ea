"""Weight-direction analysis of two checkpoints (the observation behind WaDi, arXiv 2603.08258)."""

from .checkpoint import WeightsCheckpoint, load_weights, locate_weights, save_weights_like
from .report import AnalyzeWeightsConfig, analyze_checkpoints
from .weights import (LayerChange, WeightComparison, analysable_keys, compare_weights, residual_svd_energy,
                      row_changes, swap_direction, swap_norm, swap_state_dict)

__all__ = [
    "AnalyzeWeightsConfig", "LayerChange", "WeightComparison", "WeightsCheckpoint", "analysable_keys",
    "analyze_checkpoints", "compare_weights", "load_weights", "locate_weights", "residual_svd_energy",
    "row_changes", "save_weights_like", "swap_direction", "swap_norm", "swap_state_dict",
]
