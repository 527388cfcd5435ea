"""LoRaD's fused rotate-then-matmul as an autograd Function (WaDi, arXiv 2603.08258).

Memory: autograd on the plain formula would keep ``Theta``, ``cos``, ``sin`` (fp32, ``out x in/2``
each) and ``W_rot`` alive for every adapted layer until backward. This Function saves only what the
model holds anyway (``x`` in the compute dtype, ``W``, ``bias``, ``A``, ``B``); forward builds
``W_rot`` in blocks of rows (with their angles, no larger than full fine-tuning's ``dL/dW``)
straight into the output's columns, and backward recomputes ``Theta = A @ B`` and the rotation
block by block (of output rows or of input columns), so fp32 transients stay a few MB and are never
stacked across layers. Recomputing ``Theta`` costs one
``out x r x in/2`` matmul, small next to the three ``T x out x in`` ones once ``T >> r``.
The base matmul is never run and discarded (the public code's hook does).

Gradient of the angles, with ``a' = a cos - b sin`` and ``b' = a sin + b cos`` per column pair:
``dL/dTheta = dL/da' * (-a sin - b cos) + dL/db' * (a cos - b sin) = dL/db' * a' - dL/da' * b'``,
so backward needs the rotated pair and ``dL/dW_rot = g^T x`` only. ``dL/dA = dTheta B^T``,
``dL/dB = A^T dTheta``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..base import no_autocast

__all__ = ["rotate_pairs", "lorad_linear", "angle_dtype"]

# Blocks hold at most this many weight elements (8 MB in fp32); see ``_block_elements``.
_CHUNK_ELEMENTS = 1 << 21


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


def _round_width(n: int, total: int) -> int:
    """A block width of at most about ``n`` that splits ``total`` into near-equal GEMM-friendly
    blocks (multiples of 64, at least 128)."""
    n = max(128, n // 64 * 64)
    if n >= total:
        return total
    blocks = -(-total // n)
    return min(total, -(-(-(-total // blocks)) // 64) * 64)


def _block_elements(out_features: int, in_features: int, tokens: int) -> int:
    """Most weight elements per block. Backward holds at most two block-sized fp32 transients; a
    quarter of the weight keeps them (plus A's and B's gradients) under full fine-tuning's ``dL/dW``.
    When this step's activations (``tokens * (in + out)``) dwarf the weight, blocks may grow to 1/16
    of them (a few % of the step's memory): fewer blocks are faster, each one re-reads an activation.
    Never above ``_CHUNK_ELEMENTS``."""
    weight = out_features * in_features
    return max(1, min(_CHUNK_ELEMENTS, max(weight // 4, tokens * (in_features + out_features) // 16)))


def _plan(out_features: int, in_features: int, tokens: int) -> tuple[bool, int]:
    """``(by_rows, width)`` for backward: blocks of output rows or of input columns.

    Blocks of rows re-read ``x`` and update ``dL/dx`` (~3 T*in each), blocks of columns re-read ``g``
    (~2 T*out each): pick the cheaper one.
    """
    by_rows = out_features * 2 > in_features * 3
    along, across = (out_features, in_features) if by_rows else (in_features, out_features)
    width = _round_width(_block_elements(out_features, in_features, tokens) // across, along)
    return by_rows, width if by_rows else width // 2 * 2


def _forward_rows(out_features: int, in_features: int, tokens: int) -> int:
    """Rows per forward block (forward writes disjoint column blocks of ``y``).

    Forward holds a block of ``W_rot`` and its angles (1.5 blocks of fp32) while full fine-tuning's
    backward holds a whole ``dL/dW``: blocks of 2/3 of the weight (at most ``4 * _CHUNK_ELEMENTS``)
    stay under that peak, and fewer blocks re-read ``x`` fewer times."""
    elements = max(_block_elements(out_features, in_features, tokens),
                   min(out_features * in_features * 2 // 3, 4 * _CHUNK_ELEMENTS))
    return _round_width(elements // in_features, out_features)


def _rotate_into(dst: torch.Tensor, weight: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``dst = rotate_pairs(weight, theta)`` in place, with ``dst`` of ``theta``'s dtype.

    A column pair ``(a, b)`` is the complex number ``a + ib``; rotating it by ``theta`` multiplies it by
    ``exp(i theta)``. ``dst`` and ``weight`` may be row or column slices (last stride 1, even offsets).
    """
    shape = (dst.shape[0], -1, 2)
    w = weight.to(dst.dtype)
    if w.stride(-1) != 1:
        w = w.contiguous()
    out = torch.view_as_complex(dst.view(shape))
    torch.polar(torch.ones((), dtype=theta.dtype, device=theta.device).expand_as(theta), theta, out=out)
    out.mul_(torch.view_as_complex(w.view(shape)))
    return dst


def _blocks(out_f: int, in_f: int, by_rows: bool, width: int) -> list[tuple[slice, slice, slice]]:
    """``(rows, cols, pairs)`` slices of each block."""
    if by_rows:
        return [(slice(r, min(out_f, r + width)), slice(0, in_f), slice(0, in_f // 2))
                for r in range(0, out_f, width)]
    return [(slice(0, out_f), slice(c, min(in_f, c + width)), slice(c // 2, min(in_f, c + width) // 2))
            for c in range(0, in_f, width)]


def _dtheta(gw: torch.Tensor, w_rot: torch.Tensor) -> torch.Tensor:
    """``dL/dTheta = dL/db' a' - dL/da' b'`` per pair, as a new contiguous tensor (``gw`` is
    ``dL/dW_rot``; neither input is changed)."""
    gp, wp = gw.view(gw.shape[0], -1, 2), w_rot.view(w_rot.shape[0], -1, 2)
    # Two passes straight into a contiguous result (no in-place pass, negation or copy).
    return torch.mul(gp[..., 1], wp[..., 0]).addcmul_(gp[..., 0], wp[..., 1], value=-1)


class _LoRaDLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                A: torch.Tensor, B: torch.Tensor, cdt: torch.dtype, plan: tuple[bool, int],
                fwd_rows: int) -> torch.Tensor:
        # Row blocks: y[:, rows] = x @ W_rot[rows]^T; one fp32 block (with its angles) at a time, a
        # transient no larger than full fine-tuning's dL/dW, never saved for backward.
        out_f, in_f = weight.shape
        adt = angle_dtype(A, B)
        dev = weight.device
        with no_autocast(x.device.type):
            xc = x.to(cdt)
            x2 = xc.reshape(-1, in_f)
            y = torch.empty((x2.shape[0], out_f), dtype=cdt, device=dev)
            bc = None if bias is None else bias.to(cdt)
            Af, Bf = A.to(adt), B.to(adt)
            width = fwd_rows
            buf = torch.empty(min(width, out_f) * in_f, dtype=adt, device=dev)
            for rows, _, _ in _blocks(out_f, in_f, True, width):
                theta = Af[rows] @ Bf
                w_rot = _rotate_into(buf[: theta.shape[0] * in_f].view(-1, in_f), weight[rows], theta).to(cdt)
                if bc is None:
                    torch.mm(x2, w_rot.t(), out=y[:, rows])
                else:
                    torch.addmm(bc[rows], x2, w_rot.t(), out=y[:, rows])
                del theta, w_rot
        ctx.save_for_backward(xc, weight, bias, A, B)
        ctx.cdt, ctx.plan, ctx.x_dtype = cdt, plan, x.dtype
        return y.view(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xc, weight, bias, A, B = ctx.saved_tensors
        need_x, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        cdt, (by_rows, width) = ctx.cdt, ctx.plan
        out_f, in_f = weight.shape
        adt = angle_dtype(A, B)
        grad_x = grad_w = grad_b = grad_A = grad_B = None
        dev = weight.device
        with no_autocast(gy.device.type):
            g = gy.reshape(-1, out_f).to(cdt)
            x2 = xc.reshape(-1, in_f)
            Af, Bf = A.to(adt), B.to(adt)
            if need_x:  # row blocks accumulate into it, column blocks fill disjoint columns
                grad_x = (torch.zeros if by_rows else torch.empty)(x2.shape, dtype=cdt, device=dev)
            if need_w:
                grad_w = torch.empty(weight.shape, dtype=adt, device=dev)
            if need_A:
                grad_A = (torch.empty if by_rows else torch.zeros)(A.shape, dtype=adt, device=dev)
            if need_B:
                grad_B = (torch.zeros if by_rows else torch.empty)(B.shape, dtype=adt, device=dev)
            for rows, cols, pairs in _blocks(out_f, in_f, by_rows, width):
                theta = Af[rows] @ Bf[:, pairs]
                w_rot = _rotate_into(torch.empty(theta.shape[0], 2 * theta.shape[1], dtype=adt, device=dev),
                                     weight[rows, cols], theta)  # recomputed, nothing fp32 was saved
                if not need_w:
                    del theta  # only the gradient wrt W needs the angles again
                gs = g[:, rows]
                if need_x:
                    if by_rows:
                        grad_x.addmm_(gs, w_rot.to(cdt))
                    else:
                        torch.mm(gs, w_rot.to(cdt), out=grad_x[:, cols])
                if not (need_w or need_A or need_B):
                    continue
                gw = (gs.t() @ x2[:, cols]).to(adt)  # dL/dW_rot of this block
                if need_w:  # the gradient rotated back by -theta
                    _rotate_into(grad_w[rows, cols], gw, -theta)
                    del theta
                if need_A or need_B:
                    dtheta = _dtheta(gw, w_rot)
                    del w_rot, gw  # peak: two block-sized fp32 tensors, then half of one
                    if need_A:
                        if by_rows:
                            torch.mm(dtheta, Bf.t(), out=grad_A[rows])
                        else:
                            grad_A.addmm_(dtheta, Bf[:, pairs].t())
                    if need_B:
                        if by_rows:
                            grad_B.addmm_(Af[rows].t(), dtheta)
                        else:
                            torch.mm(Af.t(), dtheta, out=grad_B[:, pairs])
                    del dtheta
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
        return grad_x, grad_w, grad_b, grad_A, grad_B, None, None, None


def lorad_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 A: torch.Tensor, B: torch.Tensor, cdt: torch.dtype | None = None,
                 block: tuple[bool, int] | None = None) -> torch.Tensor:
    """``y = x @ W_rot^T + bias`` with ``W_rot = rotate_pairs(W, A @ B)`` cast to ``cdt``.

    ``cdt`` defaults to ``x.dtype``; angles, cos and sin are computed in fp32 (float64 for float64).
    ``block`` = ``(by_rows, width)`` overrides the blocking (tests); width counts rows or columns.
    """
    out_f, in_f = weight.shape
    if in_f % 2:
        raise ValueError(f"LoRaD needs an even input width, got {in_f}")
    if block is not None and not block[0] and block[1] % 2:
        raise ValueError("column blocks must hold whole pairs (an even width)")
    tokens = x.numel() // max(1, in_f)
    fwd_rows = block[1] if block is not None and block[0] else _forward_rows(out_f, in_f, tokens)
    return _LoRaDLinear.apply(x, weight, bias, A, B, cdt or x.dtype, block or _plan(out_f, in_f, tokens),
                              fwd_rows)
