"""Does the student's capacity where the artefacts live (the UNet's convolutions) decide its quality?

A diagnostic study, not a training path: the shipped adapters cover ``nn.Linear`` layers only
(42 % of the embedded UNet's weights). Here the student is its own copy of the teacher's UNet with
either every parameter trainable (``mode=full``), only the ``nn.Linear`` / ``nn.Conv2d`` weight
matrices (``full_weights``: no biases, no normalisation scales), or a LoRaD rotation of every
``nn.Linear`` **and** ``nn.Conv2d`` weight (``mode=lorad``: each output filter, flattened to a row,
is rotated in adjacent pairs by ``A @ B``; identity at init, row norms kept), optionally with the
biases and normalisation scales trainable too (``lorad_affine``). The fake score, guidance, batch and
step are the embedded recipe's (``wadi_core.vsd.vsd_step``); the student EMA (0.99) is exported
as a one-step diffusers pipeline in the same layout as ``wadi_core.export``.

    python -m experiments.quality.full_capacity_student --out runs/fs_lorad --mode lorad --lr 1e-3
    python jobs/evaluate.py run ...   # or pipelines.evaluate.final's protocol, see docs/history/QUALITY.md
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from wadi_core.adapters.lorad.function import rotate_pairs
from wadi_core.config import from_dict
from wadi_core.export import export_one_step_pipeline
from wadi_core.local_train import prompt_stream
from wadi_core.models import load_teacher
from wadi_core.vsd import VSDConfig, WaDiDistiller, vsd_step
from wadi_core.vsd.distiller import at_least_fp32
from wadi_core.vsd.ema import AdapterEMA
from wadi_core.vsd.step import make_updaters

from pipelines.config.cli import read_recipe


class RowRotation(nn.Module):
    """LoRaD on any weight: rows = output units (a conv filter flattened), pairs of columns rotated."""

    def __init__(self, weight: torch.Tensor, rank: int) -> None:
        super().__init__()
        out, cols = weight.shape[0], weight[0].numel()
        if cols % 2:
            raise ValueError(f"a row of {cols} entries cannot be rotated in pairs")
        self.A = nn.Parameter(torch.zeros(out, rank))
        self.B = nn.Parameter(torch.empty(rank, cols // 2))
        nn.init.xavier_uniform_(self.B)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return rotate_pairs(w.flatten(1), self.A @ self.B).view_as(w).to(w.dtype)


class OwnStudent(WaDiDistiller):
    """The student is ``unet`` (its own copy); teacher and fake score share the teacher's base."""

    def __init__(self, teacher, cfg: VSDConfig, unet: nn.Module, trainable: list[nn.Parameter]) -> None:
        super().__init__(teacher, cfg)
        self.student_unet, self._student_params = unet, trainable

    def parameters(self, role):
        return list(self._student_params) if role == "student" else super().parameters(role)

    def eps(self, role, x_t, t, cond):
        if role != "student":
            return super().eps(role, x_t, t, cond)
        base, self.teacher.denoiser = self.teacher.denoiser, self.student_unet
        try:
            with self.autocast():
                return at_least_fp32(self.teacher.predict_eps(x_t.to(self.teacher.dtype), t, cond))
        finally:
            self.teacher.denoiser = base


MODES = ("full", "full_weights", "lorad", "lorad_affine")


def _affine(own: nn.Module) -> list[nn.Parameter]:
    """Biases of every layer and the scales/shifts of the normalisation layers."""
    out = []
    for module in own.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "bias" or (name == "weight" and isinstance(module, (nn.GroupNorm, nn.LayerNorm))):
                out.append(p)
    return out


def student_copy(unet: nn.Module, mode: str, rank: int) -> tuple[nn.Module, list[nn.Parameter]]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    own = copy.deepcopy(unet).requires_grad_(mode == "full")
    if mode == "full":
        return own, list(own.parameters())
    layers = [m for m in own.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if mode == "full_weights":
        return own, [m.weight.requires_grad_(True) for m in layers]
    params: list[nn.Parameter] = []
    for module in layers:
        parametrize.register_parametrization(module, "weight", RowRotation(module.weight, rank))
        params += list(module.parametrizations.weight[0].parameters())
    if mode == "lorad_affine":
        params += [p.requires_grad_(True) for p in _affine(own)]
    return own, params


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=MODES, default="lorad")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _, data = read_recipe("embedded")
    cfg = replace(from_dict(VSDConfig, data["vsd"]), gen_lr=args.lr)
    teacher = load_teacher("embedded")
    own, params = student_copy(teacher.denoiser, args.mode, args.rank)
    d = OwnStudent(teacher, cfg, own, params)
    ups = make_updaters(d)
    ema = AdapterEMA(params, 0.99)
    gen, prompts = torch.Generator().manual_seed(args.seed), prompt_stream("domain", args.seed)
    t0 = time.perf_counter()
    print(f"{args.mode}: {sum(p.numel() for p in params):,} trainable student parameters", flush=True)
    with open(out / "metrics.jsonl", "w") as log:
        for step in range(1, args.steps + 1):
            cond = teacher.encode_prompts([next(prompts) for _ in range(args.batch)])
            m = vsd_step(d, cond, ups["student"], ups["fake"], gen)
            ema.update()
            log.write(json.dumps({"step": step, **m}) + "\n")
            if step % 100 == 0:
                print(f"step {step} loss_fake {m['loss_fake']:.4f} g {m['g_abs_mean']:.3e} "
                      f"{time.perf_counter() - t0:.0f}s", flush=True)
    # The recipe's export of an untouched (identity) student gives the layout and scheduler; its
    # UNet is then replaced by this student's averaged weights, rotations baked in.
    export = export_one_step_pipeline(d, out / "export")
    with ema.applied():
        baked = copy.deepcopy(own)
    if args.mode.startswith("lorad"):
        for module in baked.modules():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    baked.save_pretrained(Path(export) / "unet", safe_serialization=True)
    (out / "result.json").write_text(json.dumps({**vars(args), "params": sum(p.numel() for p in params),
                                                 "train_seconds": time.perf_counter() - t0}, indent=1))
    print(f"export: {export}", flush=True)


if __name__ == "__main__":
    main()
