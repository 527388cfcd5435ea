"""A LoRA approximation of a LoRaD student, in the file format ``pipeline.load_lora_weights`` reads.

LoRaD rotates each row of ``W`` (``W_rot = R(Theta) W``, Theta = A B of rank r), so the weight
change ``D = W_rot - W`` is not low rank in general (it is ``(cos Theta - 1) o W + sin Theta o W'``,
elementwise). Per adapted layer we keep the best rank-R approximation of ``D`` (truncated SVD,
Eckart-Young): ``D ~ U_R S_R V_R^T = lora_B @ lora_A`` with ``lora_B = U_R sqrt(S_R)``,
``lora_A = sqrt(S_R) V_R^T``. The weight error of a layer is then exactly the SVD tail
``sqrt(sum_{i>R} s_i^2)``; at full rank (R = min(out, in)) the LoRA is the student up to float error.

Keys are diffusers/PEFT ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (no alphas: PEFT's
scale alpha / r is then 1). Loading needs ``peft`` (diffusers' LoRA backend).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file
from torch import Tensor

from wadi_core.adapters import resolve_targets
from wadi_core.export import merged_student_denoiser

__all__ = ["LayerFit", "lorad_weight_deltas", "lora_from_deltas", "save_lora_file", "LORA_FORMAT"]

LORA_FORMAT = "wadi-lora-from-lorad/1"


@dataclass(frozen=True)
class LayerFit:
    """One layer's truncated SVD: kept rank, ``||D||_F`` and the weight error ``||D - B A||_F``."""

    name: str
    shape: tuple[int, int]
    rank: int
    delta_norm: float
    tail_norm: float


def lorad_weight_deltas(teacher: "object", spec: "object", student_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{module: W_rot - W}`` (fp32, CPU) for every layer the student adapter adapts.

    ``teacher`` is a ``wadi_core.models.Teacher`` without adapters, ``spec`` the student's
    ``AdapterSpec``; the rotated weights come from ``wadi_core.export.merged_student_denoiser``
    (the same merge the diffusers export writes).
    """
    merged = merged_student_denoiser(teacher, spec, student_state, torch.float32)
    names = resolve_targets(merged, spec.resolved_targets(teacher.family, "student"))
    base = teacher.denoiser
    out = {}
    for name in names:
        layer = base.get_submodule(name)
        w = getattr(layer, "base", layer).weight.detach().to("cpu", torch.float32)
        out[name] = merged.get_submodule(name).weight.detach().to("cpu", torch.float32) - w
    return out


def lora_from_deltas(deltas: Mapping[str, Tensor], rank: int | None, prefix: str = "unet",
                     dtype: torch.dtype = torch.float32) -> tuple[dict[str, Tensor], list[LayerFit]]:
    """PEFT LoRA factors of rank ``min(rank, out, in)`` per layer (``rank=None``: full rank)."""
    if rank is not None and rank < 1:
        raise ValueError(f"LoRA rank must be >= 1 (or None for full rank), got {rank}")
    state: dict[str, Tensor] = {}
    fits: list[LayerFit] = []
    for name, delta in deltas.items():
        d = delta.to(torch.float64)  # SVD in float64: the tail of a small delta is what we report
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        r = min(rank or s.numel(), s.numel())
        root = s[:r].sqrt()
        state[f"{prefix}.{name}.lora_A.weight"] = (root[:, None] * vh[:r]).to(dtype).contiguous()
        state[f"{prefix}.{name}.lora_B.weight"] = (u[:, :r] * root[None, :]).to(dtype).contiguous()
        fits.append(LayerFit(name, tuple(d.shape), r, float(d.norm()), float(s[r:].square().sum().sqrt())))
    return state, fits


def save_lora_file(path: str | os.PathLike, state: Mapping[str, Tensor], fits: list[LayerFit],
                   scheduler_config: Mapping | None = None, info: Mapping | None = None) -> Path:
    """Write the LoRA ``.safetensors``; metadata: format, per-layer fits, the one-step scheduler config."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "wadi.format": LORA_FORMAT,
            "wadi.fits": json.dumps([asdict(f) for f in fits]), "wadi.info": json.dumps(dict(info or {}))}
    if scheduler_config is not None:
        meta["wadi.scheduler_config"] = json.dumps(dict(scheduler_config), default=str)
    save_file(dict(state), str(out), metadata=meta)
    return out
