"""World-size-independent training state: each DeepSpeed engine's full fp32 adapters and Adam moments
as one safetensors file, gathered from whatever ZeRO partitioning wrote them and scattered into whatever
partitioning (stage, world size) loads them.

DeepSpeed's own ZeRO checkpoints are partitioned by data-parallel rank and refuse another world size
("Automatic adjustment of ZeRO's optimizer state partitioning with a new world size is not currently
supported"); its universal checkpoints fix that with a conversion pass and ``torch.load(weights_only=False)``.
This file is the third path named in docs/RELIABILITY.md: no conversion, no pickle, one file per role.

File layout (``<role>.safetensors``): ``param/<name>``, ``exp_avg/<name>``, ``exp_avg_sq/<name>`` for each
trainable parameter (fp32, the module's shapes); metadata ``adam_step`` (the optimizer's step count, the
same for every parameter here) and ``format``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["MOMENT_KEYS", "FORMAT", "gather_full_state", "save_full_state", "load_full_state",
           "UnportableOptimizer"]

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")  # torch AdamW's per-parameter moments
FORMAT = "wadi-full-state-1"


class UnportableOptimizer(ValueError):
    """The engine's optimizer keeps state this file cannot carry (e.g. 8-bit AdamW's quantised blocks)."""


def _trainable(engine: Any) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _base_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's ZeRO wrapper (ZeRO-0 hands it back unwrapped)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _zero_partitioned(param: torch.nn.Parameter) -> bool:
    """True when ZeRO-1/2 holds this parameter's fp32 master and moments in partitions (the mapping
    exists on every rank, None where the rank holds no fragment: the gather is still collective)."""
    if hasattr(param, "ds_id"):
        raise UnportableOptimizer("world-size-independent checkpoints cover ZeRO stages 0-2 (the adapters "
                                  "are small enough to replicate): set train.zero_stage to 2")
    return hasattr(param, "_hp_mapping")


def _adam_step(engine: Any) -> int:
    """The optimizer's step count (0 before the first step); refuses optimizers without Adam moments."""
    opt = _base_optimizer(engine)
    steps = set()
    for state in opt.state.values():
        unknown = set(state) - {"step", *MOMENT_KEYS}
        if unknown:
            raise UnportableOptimizer(
                f"the optimizer keeps {sorted(unknown)} besides Adam's moments ({type(opt).__name__}); a "
                "world-size-independent checkpoint carries torch AdamW state only: use vsd.optimizer=adamw")
        if "step" in state:
            steps.add(int(torch.as_tensor(state["step"]).item()))
    if len(steps) > 1:
        raise UnportableOptimizer(f"parameter groups disagree on the step count: {sorted(steps)}")
    step = steps.pop() if steps else 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # a rank whose ZeRO partition is empty holds no state: take the step from the others
        t = torch.tensor([step], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        step = int(t.item())
    return step


def gather_full_state(engine: Any) -> tuple[dict[str, torch.Tensor], int]:
    """Full fp32 parameters and Adam moments of ``engine``'s trainable parameters, and the step count.
    Collective under ZeRO (every rank calls; every rank gets the full tensors)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: PLC0415 -- DeepSpeed only in the Ray train worker

    step = _adam_step(engine)
    opt = _base_optimizer(engine)
    tensors: dict[str, torch.Tensor] = {}
    for name, p in _trainable(engine):
        if _zero_partitioned(p):
            tensors[f"param/{name}"] = safe_get_full_fp32_param(p).detach().float().cpu()
            for key in MOMENT_KEYS:
                value = safe_get_full_optimizer_state(p, key) if step else None
                tensors[f"{key}/{name}"] = (torch.zeros(p.shape) if value is None else value.detach().float().cpu())
        else:  # ZeRO-0: the module holds the parameter, the torch optimizer its moments
            tensors[f"param/{name}"] = p.detach().float().cpu()
            state = opt.state.get(p, {})
            for key in MOMENT_KEYS:
                value = state.get(key)
                tensors[f"{key}/{name}"] = (torch.zeros(p.shape) if value is None else value.detach().float().cpu())
    return {k: v.contiguous() for k, v in tensors.items()}, step


def save_full_state(engine: Any, path: str | os.PathLike, rank: int) -> None:
    """Rank 0 writes ``engine``'s full state to ``path`` (a ``.safetensors`` file). Collective."""
    tensors, step = gather_full_state(engine)
    if rank == 0:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"format": FORMAT, "adam_step": str(step)})


def _ensure_zero_moments(engine: Any) -> None:
    """Create the Adam state of a ZeRO-1/2 engine that has not stepped yet (DeepSpeed creates it at
    the first step and only then links each parameter to its fragment), so that it can be set."""
    zero = engine.optimizer
    if getattr(zero, "_hp_optimizer_states_linked", True):
        return
    for flat in zero.single_partition_of_fp32_groups:  # torch AdamW's own initial state, as _init_group makes it
        zero.optimizer.state[flat] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                                      "exp_avg_sq": torch.zeros_like(flat)}
    zero._lazy_init_hp_params_optimizer_state()


def load_full_state(engine: Any, path: str | os.PathLike) -> int:
    """Every rank: set ``engine``'s parameters, Adam moments and step count from ``path``; returns the
    step count. The engine may use ZeRO stage 0, 1 or 2 at any world size. No unpickling."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state  # noqa: PLC0415 -- DeepSpeed only in the Ray train worker

    opt = _base_optimizer(engine)
    _adam_step(engine)  # refuses an optimizer whose state this file cannot fill
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a full-state file (format {meta.get('format')!r}, expected {FORMAT!r})")
        step = int(meta["adam_step"])
        if step and any(_zero_partitioned(p) for _, p in _trainable(engine)):
            _ensure_zero_moments(engine)
        names = set(f.keys())
        params = _trainable(engine)
        expected = {f"{k}/{n}" for n, _ in params for k in ("param", *MOMENT_KEYS)}
        if names != expected:
            missing, extra = sorted(expected - names)[:3], sorted(names - expected)[:3]
            raise ValueError(f"{path} does not fit this engine's adapters (missing {missing}, unexpected {extra}): "
                             "was it written by a run with another adapter config?")
        for name, p in params:
            value = f.get_tensor(f"param/{name}")
            if value.shape != p.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(value.shape)}, the engine {tuple(p.shape)}")
            moments = {key: f.get_tensor(f"{key}/{name}") for key in MOMENT_KEYS}
            if _zero_partitioned(p):
                safe_set_full_fp32_param(p, value)  # the fp32 master partition
                p.data.copy_(value.to(p.dtype))  # the module's working copy (replicated under ZeRO-1/2)
                if step:
                    for key, m in moments.items():
                        safe_set_full_optimizer_state(p, m, key)
            else:
                p.data.copy_(value.to(p.dtype))
                if step:
                    state = opt.state[p]
                    for key, m in moments.items():
                        state[key] = m.to(p.device, torch.float32).clone()
    if step:  # ZeRO-1/2: one state per flat partition, ZeRO-0 one per parameter (just filled): the same step count
        for state in opt.state.values():
            if "step" in state or "exp_avg" in state:  # an int step stays an int; torch's Adam keeps a tensor
                state["step"] = step if isinstance(state.get("step"), int) else torch.tensor(float(step))
    return step
