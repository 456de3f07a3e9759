"""Autograd functions for fake quantization with straight-through estimators.

Each function computes its forward and its backward directly (one fused expression each, few temporaries)
instead of building a graph of round/clamp/detach tricks.
"""

from __future__ import annotations

import torch

from vaqkd.quant.compiled import Fused


def _lsq_forward(x: torch.Tensor, s: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    # in fp32 whatever x's dtype (as a compiled kernel computes anyway, so eager and compiled agree exactly);
    # x * (1/s) rather than x / s: one reciprocal, 12% faster
    s = s.float()
    return (torch.clamp(torch.round(x.float() * torch.reciprocal(s)), qn, qp) * s).to(x.dtype)


def _lsq_grads(dy: torch.Tensor, x: torch.Tensor, s: torch.Tensor, qn: int, qp: int, err: bool, dims):
    """(dx, Σ dy·t) with t = round(v) - v inside the range and the clamped level outside, v = x·(1/s).

    Everything is recomputed in fp32 from x exactly as the forward computed it, so the in-range mask is the
    forward's own (a bf16 mask from a bf16-rounded step would pass gradient through elements the forward
    clipped) and the error term is exact (not the bf16-rounded x_hat minus x)."""
    v = x.float() * torch.reciprocal(s.float())
    q = torch.clamp(torch.round(v), qn, qp)
    inside = (v >= qn) & (v <= qp)
    dx = torch.where(inside, dy, 0)
    t = dy.float() * torch.where(inside, q - v if err else 0, q)
    return dx, (t.sum() if dims is None else t.sum(dim=dims, keepdim=True))


def _lsq_backward(dy: torch.Tensor, x: torch.Tensor, s: torch.Tensor, qn: int, qp: int, g: float, err: bool = True):
    """(dx, ds) for a per-tensor step s (0-d): dx straight-through inside the range, ds = g·Σ dy·(round(x/s) -
    x/s inside, Qn or Qp outside), summed in fp32 and returned in s's dtype. err=False drops the inside term:
    PACT's clipping-level gradient, which sees only the clipped elements."""
    dx, t = _lsq_grads(dy, x, s, qn, qp, err, None)
    return dx, (t * g).to(s.dtype)


FUSE_MIN_NUMEL = 1 << 16
lsq_forward = Fused(_lsq_forward)
lsq_backward = Fused(_lsq_backward)


class LSQQuant(torch.autograd.Function):
    """LSQ fake quantization (Esser et al., ICLR 2020, eqs. 1-5).

    forward:  x_hat = clamp(round(x / s), Qn, Qp) * s
    backward: dx = dy * 1[Qn <= x/s <= Qp]                           (straight-through inside the range)
              ds = g * sum(dy * (round(x/s) - x/s  inside, Qn or Qp outside)),  g = 1/sqrt(N * Qp)
    `s` is a scalar or broadcasts against `x` (per-channel); the sum runs over each step's elements.

    Speed: the backward needs only x, which the ReLU before keeps alive anyway, so nothing new is saved; it
    recomputes v = x·(1/s) and round(v) in fp32 (cheap inside one fused loop), which makes its in-range mask
    the forward's own in every dtype. The step stays fp32; tensors keep x's dtype (bf16 under autocast), the
    kernels compute in fp32 and sums accumulate in fp32; per-tensor steps on large tensors (all activations)
    use the fused kernels above.
    `err=False` drops the inside term of the step gradient (PACT's clipping-level gradient).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, s: torch.Tensor, qn: int, qp: int, grad_scale: float, err: bool = True,
                codes: bool = False):  # fmt: skip
        fused = s.ndim == 0 and x.numel() >= FUSE_MIN_NUMEL  # activations; weights are too small to matter
        ctx.save_for_backward(x, s)
        ctx.grad_scale, ctx.qn, ctx.qp, ctx.fused, ctx.err = grad_scale, qn, qp, fused, err
        if codes and fused and qn >= 0:  # (x_hat, its uint8 codes from the same pass: `_lsq_forward_codes`)
            y, c = lsq_forward_codes(x, s, qn, qp)
            ctx.mark_non_differentiable(c)
            ctx.set_materialize_grads(False)  # no zero tensor for the codes' (absent) gradient
            return y, c
        y = (lsq_forward if fused else _lsq_forward)(x, s, qn, qp)
        return (y, None) if codes else y

    @staticmethod
    def backward(ctx, dy: torch.Tensor, *_codes):
        x, s = ctx.saved_tensors
        if dy is None:  # only with codes (grads not materialised): x_hat unused
            return None, None, None, None, None, None, None
        if ctx.fused:
            dy = dy.contiguous(memory_format=_memory_format(x))
            dx, ds = lsq_backward(dy, x, s, ctx.qn, ctx.qp, ctx.grad_scale, ctx.err)
            return dx, ds, None, None, None, None, None
        dims = [d for d, n in enumerate(s.shape) if n == 1] if s.ndim else None
        dx, t = _lsq_grads(dy, x, s, ctx.qn, ctx.qp, ctx.err, dims)
        return dx, (t * ctx.grad_scale).to(s.dtype), None, None, None, None, None


def _lsq_forward_codes(x: torch.Tensor, s: torch.Tensor, qn: int, qp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_hat, codes): `_lsq_forward`'s x_hat and its unsigned codes clamp(round(x/s), Qn, Qp) as uint8 (what
    `quant.intconv`'s integer convolution reads), from the same pass (Qn >= 0)."""
    q = torch.clamp(torch.round(x.float() * torch.reciprocal(s.float())), qn, qp)
    return _lsq_forward(x, s, qn, qp), q.to(torch.uint8)


lsq_forward_codes = Fused(_lsq_forward_codes)


def _relu_lsq_forward(a: torch.Tensor, b: torch.Tensor | None, s: torch.Tensor, qp: int):
    """(h, q(h)) with h = relu(a + b): a residual block's output and its unsigned LSQ quantization in one pass."""
    h = torch.relu(a if b is None else a + b)
    return h, _lsq_forward(h, s, 0, qp)


def _relu_lsq_backward(dy: torch.Tensor, dh: torch.Tensor | None, h: torch.Tensor, s: torch.Tensor, qp: int, g: float,
                       err: bool = True):  # fmt: skip
    """(da, ds): the gradient reaching h from the quantizer (straight-through up to Qp·s) plus the one reaching
    it directly (the shortcut), through the ReLU; ds as in `_lsq_backward` (h >= 0, so only Qp can clip)."""
    dq, t = _lsq_grads(dy, h, s, 0, qp, err, None)
    da = torch.where(h > 0, dq if dh is None else dq + dh, 0)
    return da, (t * g).to(s.dtype)


def _relu_lsq_forward_codes(a: torch.Tensor, b: torch.Tensor | None, s: torch.Tensor, qp: int):
    """(h, q(h), codes of q(h)): `_relu_lsq_forward` and the codes as `_lsq_forward_codes` writes them."""
    h = torch.relu(a if b is None else a + b)
    return h, *_lsq_forward_codes(h, s, 0, qp)


relu_lsq_forward = Fused(_relu_lsq_forward)
relu_lsq_backward = Fused(_relu_lsq_backward)
relu_lsq_forward_codes = Fused(_relu_lsq_forward_codes)


class ReluLSQQuant(torch.autograd.Function):
    """h = relu(a + b) and x_hat = LSQ(h) for an unsigned per-tensor quantizer, fused: the ReLU that ends a
    residual block and the input quantizer of the next convolution, which would otherwise be three passes
    forward (add, ReLU, quantize) and four backward (quantizer, gradient sum, ReLU, ...). Returns (h, x_hat);
    h feeds the shortcut and the stage outputs, x_hat the next convolution. Gradients equal those of
    LSQQuant applied to relu(a + b)."""

    @staticmethod
    def forward(ctx, a, b, s, qp: int, grad_scale: float, err: bool = True, codes: bool = False):
        out = (relu_lsq_forward_codes if codes else relu_lsq_forward)(a, b, s, qp)
        ctx.save_for_backward(out[0], s)
        ctx.qp, ctx.grad_scale, ctx.has_b, ctx.err = qp, grad_scale, b is not None, err
        if codes:
            ctx.mark_non_differentiable(out[2])
            ctx.set_materialize_grads(False)  # no zero tensor for the codes' gradient (dh, dy may be None)
        return tuple(out)

    @staticmethod
    def backward(ctx, dh, dy, *_codes):
        h, s = ctx.saved_tensors
        fmt = _memory_format(h)
        if dy is None:  # x_hat unused: only the ReLU's gradient
            da = None if dh is None else torch.where(h > 0, dh, 0)
            ds = torch.zeros_like(s)
        else:
            dh = None if dh is None else dh.contiguous(memory_format=fmt)
            da, ds = relu_lsq_backward(dy.contiguous(memory_format=fmt), dh, h, s, ctx.qp, ctx.grad_scale, ctx.err)
        return da, (da if ctx.has_b else None), ds, None, None, None, None


def _int_add_forward(y: torch.Tensor, sc: torch.Tensor, s_mid: torch.Tensor, qn_mid: int, qp_mid: int) -> torch.Tensor:
    """h = relu(Q_mid(y) + sc): an integer-residual block's requantized conv output (signed LSQ) added to its
    shortcut, and the ReLU."""
    return torch.relu(_lsq_forward(y, s_mid, qn_mid, qp_mid) + sc)


def _int_add_backward(dh: torch.Tensor, h: torch.Tensor, y: torch.Tensor, s_mid: torch.Tensor, qn_mid: int,
                      qp_mid: int, g_mid: float):  # fmt: skip
    """(d y, d sc, d s_mid) of `_int_add_forward` (h: its output): the ReLU's mask, then Q_mid's (as
    `_lsq_backward`)."""
    dm = torch.where(h > 0, dh, 0)
    dx, t_mid = _lsq_grads(dm, y, s_mid, qn_mid, qp_mid, True, None)
    return dx, dm, (t_mid * g_mid).to(s_mid.dtype)


def _int_end_forward(y: torch.Tensor, sc: torch.Tensor, s_mid: torch.Tensor, s_next: torch.Tensor, qn_mid: int,
                     qp_mid: int, qp: int) -> torch.Tensor:  # fmt: skip
    """q(h), h = `_int_add_forward`: a block's end and the next block's stream quantizer (unsigned LSQ) in one
    pass; h itself is not kept."""
    return _lsq_forward(_int_add_forward(y, sc, s_mid, qn_mid, qp_mid), s_next, 0, qp)


def _int_end_backward(dy: torch.Tensor, y: torch.Tensor, sc: torch.Tensor, s_mid: torch.Tensor, s_next: torch.Tensor,
                      qn_mid: int, qp_mid: int, qp: int, g_mid: float, g_next: float):  # fmt: skip
    """(d y, d sc, d s_mid, d s_next) of `_int_end_forward`, h recomputed from y and sc exactly as the forward made
    it: the stream quantizer's straight-through gradient, then `_int_add_backward`."""
    h = _int_add_forward(y, sc, s_mid, qn_mid, qp_mid)
    dh, t_next = _lsq_grads(dy, h, s_next, 0, qp, True, None)
    return *_int_add_backward(dh, h, y, s_mid, qn_mid, qp_mid, g_mid), (t_next * g_next).to(s_next.dtype)


def _int_end_forward_codes(y: torch.Tensor, sc: torch.Tensor, s_mid: torch.Tensor, s_next: torch.Tensor, qn_mid: int,
                           qp_mid: int, qp: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(`_int_end_forward`, its uint8 codes as `_lsq_forward_codes` writes them)."""
    return _lsq_forward_codes(_int_add_forward(y, sc, s_mid, qn_mid, qp_mid), s_next, 0, qp)


# bf16 tensors round where the eager ops between the separate kernels store them (Q_mid's output, the sum), so
# the fused kernels compute the composite's values in every dtype
_EMULATE = {"emulate_precision_casts": True}
int_end_forward = Fused(_int_end_forward, _EMULATE)
int_end_forward_codes = Fused(_int_end_forward_codes, _EMULATE)
int_end_backward = Fused(_int_end_backward, _EMULATE)
int_add_forward = Fused(_int_add_forward, _EMULATE)
int_add_backward = Fused(_int_add_backward, _EMULATE)


class IntEndQuant(torch.autograd.Function):
    """x_next = LSQ_next(relu(LSQ_mid(y) + sc)) fused: the end of an integer-residual block (`quant.residual`)
    and the next block's stream quantizer, which would otherwise be four passes forward (quantize, add, ReLU,
    quantize) and five backward. Saves y and sc (h is recomputed); gradients equal those of the composite
    `LSQQuant` -> add -> ReLU -> `LSQQuant` (the step-gradient sums up to summation order)."""

    @staticmethod
    def forward(ctx, y, sc, s_mid, s_next, qn_mid: int, qp_mid: int, qp: int, g_mid: float, g_next: float,
                codes: bool = False):  # fmt: skip
        ctx.save_for_backward(y, sc, s_mid, s_next)
        ctx.consts = (qn_mid, qp_mid, qp, g_mid, g_next)
        if codes:  # (x_next, its uint8 codes from the same pass)
            x, c = int_end_forward_codes(y, sc, s_mid, s_next, qn_mid, qp_mid, qp)
            ctx.mark_non_differentiable(c)
            ctx.set_materialize_grads(False)
            return x, c
        return int_end_forward(y, sc, s_mid, s_next, qn_mid, qp_mid, qp)

    @staticmethod
    def backward(ctx, dy, *_codes):
        y, sc, s_mid, s_next = ctx.saved_tensors
        if dy is None:  # only with codes (grads not materialised): the output unused
            return (None,) * 10
        fmt = _memory_format(y)
        dy, sc = dy.contiguous(memory_format=fmt), sc.contiguous(memory_format=fmt)
        dx, dsc, ds_mid, ds_next = int_end_backward(dy, y, sc, s_mid, s_next, *ctx.consts)
        return dx, dsc, ds_mid, ds_next, None, None, None, None, None, None


class IntAddQuant(torch.autograd.Function):
    """h = relu(LSQ_mid(y) + sc) fused (the last block of a stage, whose output leaves the stage as a tensor):
    one pass each way instead of three forward and three backward. Saves y and h."""

    @staticmethod
    def forward(ctx, y, sc, s_mid, qn_mid: int, qp_mid: int, g_mid: float):
        h = int_add_forward(y, sc, s_mid, qn_mid, qp_mid)
        ctx.save_for_backward(h, y, s_mid)
        ctx.consts = (qn_mid, qp_mid, g_mid)
        return h

    @staticmethod
    def backward(ctx, dh):
        h, y, s_mid = ctx.saved_tensors
        dx, dsc, ds_mid = int_add_backward(dh.contiguous(memory_format=_memory_format(y)), h, y, s_mid, *ctx.consts)
        return dx, dsc, ds_mid, None, None, None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return (
        torch.channels_last
        if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )


def _ewgs_forward(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, levels: int) -> torch.Tensor:
    w = (hi - lo).clamp_min(1e-8)
    xq = torch.round(((x.float() - lo) / w).clamp(0, 1) * levels) / levels
    return (lo + w * xq).to(x.dtype)


def _ewgs_backward(dy: torch.Tensor, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, levels: int, delta: float):
    """(dx, d_lo, d_hi) of x_hat = lo + w·round(x_n·L)/L, x_n = clamp((x - lo)/w, 0, 1), w = max(hi - lo, 1e-8),
    with EWGS's scaling e = 1 + δ·sign(dy)·(x_n - x_q) of the gradient entering x_n (sign(dy·w) = sign(dy))."""
    wm = (hi - lo > 1e-8).float()  # 0 where the width is clamped: then it passes no gradient to lo, hi
    w = (hi - lo).clamp_min(1e-8)
    v = (x.float() - lo) / w
    inside = (v >= 0) & (v <= 1)
    xn = v.clamp(0, 1)
    xq = torch.round(xn * levels) / levels
    g = dy.float()
    ge = torch.where(inside, g * (1 + delta * torch.sign(g) * (xn - xq)), 0)  # dL/dx_n · w
    dx = ge.to(x.dtype)
    d_lo = (g * (1 - wm * xq)).sum() + (ge * (xn * wm - 1)).sum()
    d_hi = (g * wm * xq).sum() - (ge * xn * wm).sum()
    return dx, d_lo, d_hi


ewgs_forward = Fused(_ewgs_forward)
ewgs_backward = Fused(_ewgs_backward)


class EWGSQuant(torch.autograd.Function):
    """The whole EWGS quantizer (interval, discretizer with its gradient scaling, and back) as one kernel each
    way, for per-tensor intervals on large tensors; the same gradients as the composite of `EWGSDiscretize`
    with autograd through the interval, computed in fp32."""

    @staticmethod
    def forward(ctx, x, lo, hi, levels: int, delta: float):
        ctx.save_for_backward(x, lo, hi)
        ctx.levels, ctx.delta = levels, delta
        return ewgs_forward(x, lo, hi, levels)

    @staticmethod
    def backward(ctx, dy):
        x, lo, hi = ctx.saved_tensors
        dy = dy.contiguous(memory_format=_memory_format(x))
        dx, d_lo, d_hi = ewgs_backward(dy, x, lo, hi, ctx.levels, ctx.delta)
        return dx, d_lo.to(lo.dtype), d_hi.to(hi.dtype), None, None


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
