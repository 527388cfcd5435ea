"""Small flag and counter all-reduces used by the train loop, on the training device.

NCCL (Ray Train's backend on GPUs) reduces CUDA tensors only: a CPU tensor handed to
``all_reduce`` raises there, while gloo on a CPU machine accepts it, so a CPU-only test suite
would never notice. Every helper here therefore takes the device explicitly (no default) and
builds its tensor on it. This module imports only ``torch.distributed``: the GPU check
(``benchmarks/gpu_check.py``) and tests use it without Ray or DeepSpeed installed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_ranks_true", "any_rank_true", "sum_over_ranks", "weighted_mean_over_ranks", "collective_device"]


def collective_device(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device``; under NCCL it must be a CUDA device (clear error if not)."""
    device = torch.device(device)
    if dist.is_initialized() and dist.get_backend() == "nccl" and device.type != "cuda":
        raise ValueError(f"the process group uses NCCL, which reduces CUDA tensors only, but the collective was "
                         f"asked to run on {device}: pass the training device (ray.train.torch.get_device())")
    return device


def all_ranks_true(flag: bool, device: torch.device | str) -> bool:
    """Collective AND: e.g. an epoch ends for everyone when any rank runs out of full batches."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def any_rank_true(flag: bool, device: torch.device | str) -> bool:
    """Collective OR (rank clocks differ: one decision for everyone)."""
    return not all_ranks_true(not flag, device)


def sum_over_ranks(values: list[int], device: torch.device | str) -> list[int]:
    """Element-wise sum of integer counters over all ranks."""
    t = torch.tensor(values, dtype=torch.int64, device=collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [int(v) for v in t.tolist()]


def weighted_mean_over_ranks(values: list[float], weight: float, device: torch.device | str) -> list[float]:
    """Element-wise mean of ``values`` over all ranks, each rank weighted by ``weight`` (e.g. its
    sample count: per-rank mean losses -> the global batch's mean loss). fp64 sums."""
    t = torch.tensor([*(v * weight for v in values), weight], dtype=torch.float64, device=collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    total = float(t[-1])
    return [float(v) / total for v in t[:-1].tolist()]
