"""DeepSpeed engines for the two trained roles, and the ``Updater`` that ``vsd_step`` drives.

Each engine wraps ``adapter_modules(denoiser, role)``: a ModuleList whose parameters are exactly
one adapter's, so the frozen shared base sits outside both optimizers (and both ZeRO partitions).
The denoiser itself is never called through an engine: ``vsd_step`` runs the adapted denoiser,
and the engine only owns backward / clip / step / checkpoint of its adapter's parameters.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from wadi_core.vsd import VSDConfig

from pipelines.config import TrainConfig

__all__ = ["deepspeed_config", "init_distributed", "build_engine", "DeepSpeedUpdater"]


def deepspeed_config(train: TrainConfig, vsd: VSDConfig) -> dict[str, Any]:
    """DeepSpeed JSON config for one role (same for student and fake; lr lives in the optimizer)."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.per_worker_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": train.global_batch,
        "gradient_clipping": vsd.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        # We pass torch's AdamW: DeepSpeed's CPUAdam/FusedAdam would compile C++ ops for minutes.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if vsd.mixed_precision == "bf16":  # bf16 adapter weights, fp32 master copy in the optimizer
        cfg["bf16"] = {"enabled": True}
    elif vsd.mixed_precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return cfg


def init_distributed() -> None:
    """``deepspeed.init_distributed`` on the process group Ray Train already set up.

    Without a GPU, DeepSpeed would first compile a shared-memory all-reduce op (~95 s on this
    kind of machine); we mark it unavailable so gloo does the (tiny) adapter all-reduces.
    """
    import deepspeed
    import deepspeed.ops

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
        deepspeed.init_distributed(dist_backend="gloo")
    else:
        deepspeed.init_distributed(dist_backend="nccl")


def build_engine(module: torch.nn.Module, lr: float, train: TrainConfig, vsd: VSDConfig) -> Any:
    """A DeepSpeed engine over ``module`` (one adapter's parameters) with torch AdamW (paper: wd 0)."""
    import deepspeed

    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the adapter module has no trainable parameters: was the adapter added?")
    optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(vsd.adam_betas), weight_decay=vsd.weight_decay)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=deepspeed_config(train, vsd),
        dist_init_required=False,
    )
    return engine


class DeepSpeedUpdater:
    """``wadi_core.vsd.Updater`` backed by a DeepSpeed engine (clip + step + zero grad in ``step``)."""

    def __init__(self, engine: Any):
        self.engine = engine

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float:
        self.engine.step()  # clips to gradient_clipping, steps the optimizer, zeroes grads
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return float("nan")
        return float(norm.item() if isinstance(norm, torch.Tensor) else norm)
