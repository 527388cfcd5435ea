"""DeepSpeed engines for the two trained roles, and the ``Updater`` that ``vsd_step`` drives.

Each engine wraps ``adapter_modules(denoiser, role)``: a ModuleList whose parameters are exactly
one adapter's, so the frozen shared base sits outside both optimizers (and both ZeRO partitions).
The denoiser itself is never called through an engine: ``vsd_step`` runs the adapted denoiser,
and the engine only owns backward / clip / step / checkpoint of its adapter's parameters.

Precision: the engines are always fp32 (no ``bf16`` / ``fp16`` section). DeepSpeed's bf16 / fp16
modes cast the engine's module, i.e. the adapters' angles, to half precision and keep fp32 only as
the optimizer's master copy; the official code keeps the angles in fp32 and only the frozen base in
half precision under autocast. ``vsd.mixed_precision`` does exactly that in ``WaDiDistiller`` (half
base, fp32 adapters, torch.autocast forward); for fp16 ``DeepSpeedUpdater`` scales the loss as
torch's GradScaler would. DeepSpeed's own ``torch_autocast`` section would only wrap ``engine(x)``,
which is never called; its fp16 GradScaler never stepped under ZeRO-2 with DeepSpeed 0.19.8 on this
CPU (every step skipped at scale 65536), so it is not used.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist

from wadi_core.vsd import StepResult, VSDConfig
from wadi_core.vsd.optim import make_optimizer

from pipelines.config.job import TrainConfig
from pipelines.train.checkpoint import install_safe_loading

__all__ = ["deepspeed_config", "init_distributed", "build_engine", "DeepSpeedUpdater", "full_params"]


def deepspeed_config(train: TrainConfig, vsd: VSDConfig, world: int | None = None) -> dict[str, Any]:
    """DeepSpeed JSON config for one role (same for student and fake; lr lives in the optimizer) at
    world size ``world`` (None: ``train.num_workers``): the global batch is the same at every size."""
    world = world or train.num_workers
    # DeepSpeed asserts train_batch_size = micro-batch x accumulation x world. It never sees a batch here
    # (no DeepSpeed data loader): an elastic world that does not divide the global batch splits it
    # unevenly (pipelines.runtime.shares.rank_slice) and names its largest share.
    micro = -(-train.global_batch // world)
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro * world,
        "gradient_clipping": vsd.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        # We pass torch's AdamW (or bitsandbytes' 8-bit one): DeepSpeed's CPUAdam/FusedAdam would
        # compile C++ ops for minutes.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    # No bf16 / fp16 section whatever vsd.mixed_precision says: the adapters stay fp32 (module docstring).
    return cfg


def init_distributed() -> None:
    """``deepspeed.init_distributed`` on the process group Ray Train already set up.

    Without a GPU, DeepSpeed would first compile a shared-memory all-reduce op (~95 s on this
    kind of machine); we mark it unavailable so gloo does the (tiny) adapter all-reduces.
    """
    import deepspeed  # noqa: PLC0415 -- DeepSpeed only in the Ray train worker
    import deepspeed.ops  # noqa: PLC0415 -- DeepSpeed only in the Ray train worker

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder  # noqa: PLC0415 -- Ray worker only

        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
        deepspeed.init_distributed(dist_backend="gloo")
    else:
        deepspeed.init_distributed(dist_backend="nccl")


def build_engine(module: torch.nn.Module, lr: float, train: TrainConfig, vsd: VSDConfig,
                 world: int | None = None) -> Any:
    """A DeepSpeed engine over ``module`` (one adapter's parameters) with ``vsd.optimizer`` (torch AdamW
    or bitsandbytes' AdamW8bit; paper: wd 0) as its client optimizer, at world size ``world``
    (None: ``train.num_workers``)."""
    import deepspeed  # noqa: PLC0415 -- DeepSpeed only in the Ray train worker

    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the adapter module has no trainable parameters: was the adapter added?")
    optimizer = make_optimizer(params, vsd.optimizer, lr, tuple(vsd.adam_betas), vsd.weight_decay)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=deepspeed_config(train, vsd, world),
        dist_init_required=False,
    )
    install_safe_loading(engine)  # DeepSpeed's own loader would unpickle anything found in storage
    return engine


class DeepSpeedUpdater:
    """``wadi_core.vsd.Updater`` backed by a DeepSpeed engine (check + clip + step + zero grad in ``step``).

    Before ``engine.step()`` every rank checks its loss and the gradients it holds (all of them
    under ZeRO-0, its partition under ZeRO-1/2/3) and one all-reduce agrees on finiteness and the
    global norm, so a non-finite step is skipped on every rank. DeepSpeed's own skip covers only
    some precisions and stages (ZeRO-0 fp32 would step into NaN weights) and counts nothing.

    ``fp16=True`` (``vsd.mixed_precision=fp16``): dynamic loss scaling with torch GradScaler's
    defaults (start 2^16, halve on overflow, double after 2,000 good steps). The gradients are
    unscaled before DeepSpeed clips and steps; a step whose scaled gradients overflowed is the
    scaler's business (skipped, not counted as non-finite), as in ``TorchUpdater``.
    """

    INIT_SCALE, GROWTH_INTERVAL = 2.0 ** 16, 2000

    def __init__(self, engine: Any, fp16: bool = False, loss_weight: float = 1.0):
        self.engine = engine
        # This rank's share of the global batch over an even share (n_r * world / global batch):
        # DeepSpeed averages the ranks' gradients, so weighted losses average to the global batch's
        # mean loss when an elastic world splits it unevenly. 1.0 for an even split.
        self.loss_weight = loss_weight
        self._loss_finite = torch.ones((), dtype=torch.bool)
        self.loss_scale = self.INIT_SCALE if fp16 else 1.0
        self._fp16 = fp16
        self._good_steps = 0

    def backward(self, loss: torch.Tensor) -> None:
        self._loss_finite = torch.isfinite(loss.detach()).all()
        if self.loss_weight != 1.0:
            loss = loss * self.loss_weight
        self.engine.backward(loss * self.loss_scale if self._fp16 else loss)

    def _local_grads(self) -> tuple[list[torch.Tensor], bool]:
        """The gradients this rank holds after backward, and whether every rank holds all of them
        (ZeRO-0: all-reduced ``param.grad``) or a disjoint partition (ZeRO-1/2/3)."""
        partitions = getattr(self.engine.optimizer, "averaged_gradients", None)
        if self.engine.zero_optimization_stage() > 0 and partitions is not None:
            groups = partitions.values() if isinstance(partitions, dict) else partitions
            return [g for group in groups if group is not None for g in group if g is not None], False
        return [p.grad for p in self.engine.module.parameters() if p.grad is not None], True

    def step(self) -> StepResult:
        grads, replicated = self._local_grads()
        sq = torch.zeros((), dtype=torch.float64, device=self.engine.device)
        for g in grads:
            sq += g.detach().double().pow(2).sum().to(sq.device)
        bad = (~self._loss_finite).to(sq.device, torch.float64)
        stats = torch.stack([bad, sq])
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)  # nan / inf on any rank reach every rank
        norm = float((stats[1] / (world if replicated else 1)).sqrt()) / self.loss_scale
        if stats[0] == 0 and self._fp16 and not math.isfinite(norm):  # the scale was too high: lower it
            self.loss_scale /= 2
            self._good_steps = 0
            self._drop_gradients(grads)
            return StepResult(norm, True)
        if stats[0] == 0 and math.isfinite(norm):
            if self._fp16:
                for g in grads:  # every rank unscales what it holds, before DeepSpeed's clip sees it
                    g.mul_(1.0 / self.loss_scale)
                self._good_steps += 1
                if self._good_steps >= self.GROWTH_INTERVAL:
                    self.loss_scale *= 2
                    self._good_steps = 0
            self.engine.step()  # clips to gradient_clipping, steps the optimizer, zeroes grads
            return StepResult(norm, True)
        self._drop_gradients(grads)
        return StepResult(norm if not math.isfinite(norm) else float("nan"), False)

    def _drop_gradients(self, grads: list[torch.Tensor]) -> None:
        """Skip this step on this rank (every rank calls it: the decision was all-reduced)."""
        if not hasattr(self.engine.optimizer, "overflow"):  # a plain torch optimizer (ZeRO-0, fp32)
            self.engine.zero_grad()
            return
        # DeepSpeed's optimizers (ZeRO-1/2/3, ZeRO-0 bf16) free their gradient buffers on their own
        # overflow path, taken when the global grad norm is not finite: make sure it is (the loss
        # alone may have been the non-finite part), and let that path unwind their state.
        if grads:
            grads[0].mul_(float("nan"))
        self.engine.step()
        if self.engine.was_step_applied():
            raise RuntimeError("DeepSpeed applied an optimizer step that every rank agreed to skip "
                               "(non-finite loss or gradient): its overflow handling changed; "
                               "check pipelines/train/engines.py against the installed DeepSpeed version")


@contextlib.contextmanager
def full_params(engines: Mapping[str, Any], zero_stage: int) -> Iterator[None]:
    """Under ZeRO-3 gather the adapters' parameters on every rank (a collective); else a no-op."""
    if zero_stage != 3:
        yield
        return
    import deepspeed  # noqa: PLC0415 -- DeepSpeed only in the Ray train worker

    params = [p for e in engines.values() for p in e.module.parameters()]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield
