"""The integer grid of the ONNX export: BatchNorm folding, activation steps, and how far a fused conv's input codes
and weight codes are spread so that its int32 bias holds the BatchNorm shift closely without any u8·s8 pair
overflowing int16 (why: `deploy.onnx_export`'s docstring; measured: `benchmarks/onnx_bias_grid.py`)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from vaqkd.deploy.artifact import ExportError


def bn_fold(bn: nn.BatchNorm2d) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) per channel with BN(y) = scale·y + shift, in float64 then float32."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    scale = bn.weight.detach().double() / torch.sqrt(var + bn.eps)
    shift = bn.bias.detach().double() - mean * scale
    return scale.numpy(), shift.numpy()


def act_step(q: nn.Module) -> float:
    from vaqkd.quant import LSQQuantizer, PACTQuantizer

    if isinstance(q, PACTQuantizer):
        return float(q.alpha.detach()) / (2**q.bits - 1)
    if isinstance(q, LSQQuantizer) and not q.per_channel:
        return float(q.step.detach())
    raise ExportError(f"{type(q).__name__} activations cannot be exported to ONNX (LSQ or PACT only)")


INT16_PAIR = 16383  # |a|·|w| bound: u8·s8 pairs summed in int16 (vpmaddubsw, x86 without VNNI) cannot saturate


def input_spread(q: nn.Module, w_span: int) -> int:
    """How far a fused conv's input codes are spread (code·k at step/k): as far as 8 bits allow while every
    product with the weight codes (scaled by up to 127 // w_span) stays within `INT16_PAIR`."""
    a_max = q.qp if not q.signed else max(-q.qn, q.qp)
    w_max = w_span * max(127 // w_span, 1)
    if q.signed:  # the uint8 operand is 128 + code·k (zero point 128): its magnitude reaches 128 + a_max·k
        return max(1, min(127 // a_max, (INT16_PAIR // w_max - 128) // a_max))
    return max(1, min(255 // a_max, INT16_PAIR // (a_max * w_max)))


def exact_in_int16(layer: nn.Module) -> bool:
    """Whether an integer kernel computes the layer exactly: every u8·s8 product pair of its input codes (uint8,
    at zero point 128 where signed) and weight codes fits `INT16_PAIR`. 8-bit inputs times 8-bit weights (a W8A8
    stem or classifier, `first_last = "8"`) do not: ORT's optimiser, given DQ -> Conv -> Q, makes such a layer an
    integer kernel (quantizing its float weights itself where they are float), and its codes moved on this x86
    without VNNI (agreement with PyTorch fell to 52-81 % on a test ResNet-20). Such layers stay float, sealed
    (`onnx_build.Builder.float_sealed`)."""
    a, w = layer.a_quant, layer.w_quant
    a_top = a.qp if not a.signed else 128 + max(-a.qn, a.qp)
    return a_top * max(-w.qn, w.qp) <= INT16_PAIR


def bias_multipliers(shift: np.ndarray, unit: np.ndarray, m_max: int) -> np.ndarray:
    """Per output channel, the weight multiplier m in 1..m_max whose int32 bias grid (unit / m) holds the
    BatchNorm shift most closely: the error |shift − round(shift·m/unit)·unit/m| is what QLinearConv adds to
    every output of the channel, and at 2 bits it moves codes that lie near a rounding boundary."""
    ms = np.arange(1, m_max + 1)
    grid = (unit[:, None] / ms[None, :]).astype(np.float32).astype(np.float64)  # as b_scale in onnx_build.Builder.conv
    with np.errstate(divide="ignore", invalid="ignore"):  # a channel of scale 0 (γ = 0): no grid, any m
        err = np.abs(shift[:, None] - np.round(shift[:, None] / grid) * grid)
    return ms[np.argmin(np.nan_to_num(err, nan=np.inf), axis=1)]


PIXEL_BITS = 10  # the normalised pixels' high part: a·2^e with |a| <= 2^10 (`onnx_build.Builder.pixels_conv`)


def pixel_tables(normalise: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(n, n_hi, n_lo, e), each table (C, 256) float32: n the normalised value of every pixel value x in 0..255,
    (x − mean255)/std255 in float32 as the loader computes it; n_hi = round(n / 2^e)·2^e with |n_hi / 2^e| <=
    2^PIXEL_BITS, n_lo = n − n_hi (exact in float32: n_hi is 0 or within 2^-10 of n's magnitude on a coarser grid)."""
    mean, std = (np.asarray(a, np.float32).reshape(-1, 1) for a in normalise)
    n = (np.arange(256, dtype=np.float32)[None, :] - mean) / std
    e = int(np.frexp(np.abs(n).max())[1]) - PIXEL_BITS
    n_hi = np.round(n * np.float32(2.0**-e)) * np.float32(2.0**e)
    n_lo = n - n_hi
    if not np.array_equal(n_hi.astype(np.float64) + n_lo, n.astype(np.float64)):
        raise ExportError("the normalised pixels do not split exactly in float32 (a bug)")
    return n, n_hi, n_lo, e


def split_exact(w: np.ndarray, in_bits: int = PIXEL_BITS) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(hi, lo, unit) with w = hi + lo per output channel (axis 0): hi = k·unit, unit a power of two, |k| as wide
    as lets the conv's fan-in products with `in_bits`-bit integers sum within 2^23 (so a float32 conv of hi on such
    inputs is exact, in any order of summation); lo the rest (rounded to float32). None where hi would keep fewer
    than 4 bits (a fan-in too large for the split to pay)."""
    fan_in = w[0].size
    bits = int(np.floor(np.log2(2.0**23 / (fan_in * 2.0**in_bits))))
    if bits < 4:
        return None
    peak = np.abs(w.reshape(len(w), -1)).max(1)
    unit = np.ldexp(1.0, np.frexp(peak)[1] - bits)  # |w / unit| < 2^bits
    u = unit.reshape(-1, *[1] * (w.ndim - 1))
    hi = np.round(w / u) * u
    return hi.astype(np.float32), (w - hi).astype(np.float32), unit
