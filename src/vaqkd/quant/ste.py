"""Autograd functions for fake quantization with straight-through estimators.

Each function computes its forward and its backward directly (one fused expression each, few temporaries)
instead of building a graph of round/clamp/detach tricks.
"""

from __future__ import annotations

import torch


class LSQQuant(torch.autograd.Function):
    """LSQ fake quantization (Esser et al., ICLR 2020, eqs. 1-5).

    forward:  x_hat = clamp(round(x / s), Qn, Qp) * s
    backward: dx = dy * 1[Qn <= x/s <= Qp]                           (straight-through inside the range)
              ds = g * sum(dy * (round(x/s) - x/s  inside, Qn or Qp outside)),  g = 1/sqrt(N * Qp)
    `s` is a scalar or broadcasts against `x` (per-channel); the sum runs over each step's elements.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, s: torch.Tensor, qn: int, qp: int, grad_scale: float) -> torch.Tensor:
        v = x / s
        q = v.round().clamp_(qn, qp)
        ctx.save_for_backward(v, q)
        ctx.grad_scale, ctx.qn, ctx.qp, ctx.s_shape = grad_scale, qn, qp, s.shape
        return q * s

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        v, q = ctx.saved_tensors
        inside = (v >= ctx.qn) & (v <= ctx.qp)
        dx = dy * inside
        ds = dy * torch.where(inside, q - v, q)  # q equals Qn or Qp outside the range
        if len(ctx.s_shape) == 0 or ctx.s_shape.numel() == 1:
            ds = ds.sum().reshape(ctx.s_shape)
        else:
            dims = [d for d, n in enumerate(ctx.s_shape) if n == 1]
            ds = ds.sum(dim=dims, keepdim=True)
        return dx, ds * ctx.grad_scale, None, None, None


class EWGSDiscretize(torch.autograd.Function):
    """EWGS discretizer (Lee et al., CVPR 2021, eq. 6) on normalised inputs x_n in [0, 1].

    forward:  x_q = round(x_n * L) / L,  L = 2^b - 1
    backward: g_n = g_q * (1 + delta * sign(g_q) * (x_n - x_q))   (delta = 0: plain straight-through)
    """

    @staticmethod
    def forward(ctx, xn: torch.Tensor, levels: int, delta: float) -> torch.Tensor:
        xq = (xn * levels).round_().div_(levels)
        ctx.save_for_backward(xn - xq)
        ctx.delta = delta
        return xq

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (diff,) = ctx.saved_tensors
        if ctx.delta == 0:
            return g, None, None
        return g * (1 + ctx.delta * torch.sign(g) * diff), None, None


class RoundSTE(torch.autograd.Function):
    """round(x) with an identity gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.round()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g
