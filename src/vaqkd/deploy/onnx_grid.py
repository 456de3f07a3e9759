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


def conv_bn_fold(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) per output channel in float64 with bn(conv(x)) = scale·conv_nobias(x) + shift: the BatchNorm
    after the conv (if any) and the conv's own bias folded together. Every exported conv passes here, so a padding
    other than zeros (which the ONNX graph and torch's int8 program would compute as zeros) is refused here."""
    if conv.padding_mode != "zeros":
        raise ExportError(f"a conv with padding_mode={conv.padding_mode!r}: only zero padding exports")
    scale, shift = bn_fold(bn) if bn is not None else (np.ones(conv.out_channels), np.zeros(conv.out_channels))
    if conv.bias is not None:
        shift = shift + scale * conv.bias.detach().double().numpy()
    return scale, shift


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
