"""Student-vs-teacher weight analysis on the adapted layers, and the swap students (WaDi, arXiv 2603.08258).

The comparison is restricted to the layers the student adapter is on: the other weights are the
teacher's own (frozen), and including them would dilute the per-layer means with zeros.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

from wadi_core.adapters import adapted_layers, adapter_info, adapter_state_dict, load_adapter_state_dict
from wadi_core.analysis import WeightComparison, compare_weights, swap_state_dict

__all__ = ["adapted_weights", "compare_student", "swapped_full_state", "use_student_state"]


@torch.no_grad()
def adapted_weights(denoiser: nn.Module, name: str = "student") -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``({"<layer>.weight": teacher W}, {"<layer>.weight": student W'})`` on adapter ``name``'s layers
    (float32, CPU). The student weight is the adapter's effective (merged) weight."""
    teacher, student = {}, {}
    for layer_name, layer in adapted_layers(denoiser, name).items():
        if layer.merged_adapter is not None:
            raise RuntimeError(f"{layer_name}: adapter {layer.merged_adapter!r} is merged; unmerge it first")
        teacher[f"{layer_name}.weight"] = layer.weight.detach().float().cpu().clone()
        student[f"{layer_name}.weight"] = layer.adapters[name].merged_weight(layer).float().cpu()
    return teacher, student


def compare_student(denoiser: nn.Module, svd_fraction: float | None = None, name: str = "student") -> WeightComparison:
    """Per-row norm and direction change of the student against the teacher, adapted layers only."""
    teacher, student = adapted_weights(denoiser, name)
    return compare_weights(teacher, student, svd_fraction=svd_fraction, progress=False)


def swapped_full_state(denoiser: nn.Module, what: str, name: str = "student") -> dict[str, Tensor]:
    """The state of a ``full`` student adapter with the teacher's row ``"norm"`` or row ``"direction"``
    on every adapted weight (biases stay the student's). Load it with ``use_student_state``."""
    info = adapter_info(denoiser, name)
    if info["kind"] != "full":
        raise ValueError(f"swaps need a fully fine-tuned student (kind 'full'), this one is {info['kind']!r}")
    teacher, _ = adapted_weights(denoiser, name)
    state = {k: v.detach().cpu().clone() for k, v in adapter_state_dict(denoiser, name).items()}
    weight_keys = [k for k in state if k in teacher]
    if len(weight_keys) != len(teacher):
        raise RuntimeError("full adapter state keys do not match the adapted layers' weights")
    return swap_state_dict(state, teacher, what, keys=weight_keys)


@contextlib.contextmanager
def use_student_state(denoiser: nn.Module, state: dict[str, Tensor], name: str = "student") -> Iterator[None]:
    """Temporarily load ``state`` into adapter ``name`` (restored on exit)."""
    original = {k: v.detach().clone() for k, v in adapter_state_dict(denoiser, name).items()}
    load_adapter_state_dict(denoiser, name, state)
    try:
        yield
    finally:
        load_adapter_state_dict(denoiser, name, original)
