"""LoRaD's fused rotate-then-matmul as an autograd Function (ALGORITHM.md section 2).

Memory: autograd on the plain formula would keep ``Theta``, ``cos``, ``sin`` (fp32, ``out x in/2``
each) and ``W_rot`` alive for every adapted layer until backward. This Function saves only what the
model holds anyway (``x`` in the compute dtype, ``W``, ``bias``, ``A``, ``B``) and recomputes the
rotation in backward, row chunk by row chunk, so the fp32 transients stay small and are never
stacked across layers. The base matmul is never run and discarded (the public code's hook does).

Gradient of the angles, with ``a' = a cos - b sin`` and ``b' = a sin + b cos`` per column pair:
``dL/dTheta = dL/da' * (-a sin - b cos) + dL/db' * (a cos - b sin) = dL/db' * a' - dL/da' * b'``,
so backward needs the rotated pair and ``dL/dW_rot = g^T x`` only. ``dL/dA = dTheta B^T``,
``dL/dB = A^T dTheta``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["rotate_pairs", "lorad_linear", "angle_dtype"]

# Rows per chunk are chosen so a chunk holds about this many weight elements (1 MB in fp32): the
# fp32 transients of the rotation then stay far below one weight gradient.
_CHUNK_ELEMENTS = 1 << 18


def angle_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 at least (the spec), float64 when the inputs are float64 (gradcheck)."""
    dt = torch.float32
    for t in tensors:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def rotate_pairs(weight: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent column pairs ``(W[:, 2k], W[:, 2k+1])`` of each row by ``theta[:, k]``.

    Plain autograd-friendly reference; returns ``theta.dtype``. ``theta`` has shape ``(out, in/2)``.
    """
    w = weight.to(theta.dtype).unflatten(-1, (-1, 2))
    a, b = w[..., 0], w[..., 1]
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        return contextlib.nullcontext()


def _chunk_rows(out_features: int, in_features: int) -> int:
    return max(16, _CHUNK_ELEMENTS // max(1, in_features))


def _rotate_into(dst: torch.Tensor, weight: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``dst = rotate_pairs(weight, theta)`` without temporaries beyond ``exp(i theta)``.

    A column pair ``(a, b)`` is the complex number ``a + ib``; rotating it by ``theta`` is multiplying
    by ``exp(i theta)``. ``dst`` is contiguous with ``theta``'s dtype.
    """
    rows = dst.shape[0]
    w = weight.to(dst.dtype).contiguous()
    rot = torch.polar(torch.ones_like(theta), theta)
    torch.mul(torch.view_as_complex(w.view(rows, -1, 2)), rot, out=torch.view_as_complex(dst.view(rows, -1, 2)))
    return dst


class _LoRaDLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                A: torch.Tensor, B: torch.Tensor, cdt: torch.dtype, chunk_rows: int) -> torch.Tensor:
        out_f, in_f = weight.shape
        adt = angle_dtype(A, B)
        with _no_autocast(x.device.type):
            w_rot = torch.empty((out_f, in_f), dtype=cdt, device=weight.device)
            buf = None if cdt == adt else torch.empty((min(chunk_rows, out_f), in_f), dtype=adt, device=weight.device)
            Bf = B.to(adt)
            for r0 in range(0, out_f, chunk_rows):
                r1 = min(out_f, r0 + chunk_rows)
                theta = A[r0:r1].to(adt) @ Bf
                if buf is None:
                    _rotate_into(w_rot[r0:r1], weight[r0:r1], theta)
                else:  # angles and rotation in fp32, result cast to the compute dtype
                    w_rot[r0:r1] = _rotate_into(buf[: r1 - r0], weight[r0:r1], theta)
                del theta
            xc = x.to(cdt)
            y = F.linear(xc, w_rot, None if bias is None else bias.to(cdt))
        ctx.save_for_backward(xc, weight, bias, A, B)
        ctx.cdt, ctx.chunk_rows, ctx.x_dtype = cdt, chunk_rows, x.dtype
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xc, weight, bias, A, B = ctx.saved_tensors
        need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        cdt, chunk_rows = ctx.cdt, ctx.chunk_rows
        out_f, in_f = weight.shape
        adt = angle_dtype(A, B)
        grad_x = grad_w = grad_b = grad_A = grad_B = None
        dev = weight.device
        with _no_autocast(gy.device.type):
            g = gy.reshape(-1, out_f).to(cdt)
            x2 = xc.reshape(-1, in_f)
            Bf, Af = B.to(adt), A.to(adt)
            if need_x:
                grad_x = torch.zeros(x2.shape, dtype=cdt, device=dev)
            if need_w:
                grad_w = torch.empty(weight.shape, dtype=adt, device=dev)
            if need_A:
                grad_A = torch.empty(A.shape, dtype=adt, device=dev)
            if need_B:
                grad_B = torch.zeros(B.shape, dtype=adt, device=dev)
            buf = torch.empty((min(chunk_rows, out_f), in_f), dtype=adt, device=dev)
            for r0 in range(0, out_f, chunk_rows):
                r1 = min(out_f, r0 + chunk_rows)
                theta = Af[r0:r1] @ Bf
                w_rot = _rotate_into(buf[: r1 - r0], weight[r0:r1], theta)  # recomputed: nothing fp32 saved
                gs = g[:, r0:r1]
                if need_x:
                    grad_x.addmm_(gs, w_rot.to(cdt))
                if not (need_w or need_A or need_B):
                    continue
                gw = (gs.t() @ x2).to(adt)  # dL/dW_rot for these rows
                if need_A or need_B:
                    gp, wp = gw.view(r1 - r0, -1, 2), w_rot.view(r1 - r0, -1, 2)
                    dtheta = gp[..., 1] * wp[..., 0]  # dL/db' a' - dL/da' b'
                    dtheta.addcmul_(gp[..., 0], wp[..., 1], value=-1)
                    if need_A:
                        grad_A[r0:r1] = dtheta @ Bf.t()
                    if need_B:
                        grad_B.addmm_(Af[r0:r1].t(), dtheta)
                    del dtheta
                if need_w:  # the gradient rotated back by -theta
                    _rotate_into(grad_w[r0:r1], gw, -theta)
                del theta, gw
            if need_b:
                grad_b = g.sum(0).to(bias.dtype)
        if grad_x is not None:
            grad_x = grad_x.view(xc.shape).to(ctx.x_dtype)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_A is not None:
            grad_A = grad_A.to(A.dtype)
        if grad_B is not None:
            grad_B = grad_B.to(B.dtype)
        return grad_x, grad_w, grad_b, grad_A, grad_B, None, None


def lorad_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 A: torch.Tensor, B: torch.Tensor, cdt: torch.dtype | None = None,
                 chunk_rows: int | None = None) -> torch.Tensor:
    """``y = x @ W_rot^T + bias`` with ``W_rot = rotate_pairs(W, A @ B)`` cast to ``cdt``.

    ``cdt`` defaults to ``x.dtype``; angles, cos and sin are computed in fp32 (float64 for float64).
    """
    if weight.shape[1] % 2:
        raise ValueError(f"LoRaD needs an even input width, got {weight.shape[1]}")
    cdt = cdt or x.dtype
    rows = chunk_rows or _chunk_rows(*weight.shape)
    return _LoRaDLinear.apply(x, weight, bias, A, B, cdt, rows)
