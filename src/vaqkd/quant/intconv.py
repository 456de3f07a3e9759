"""The quantized convolution's forward as an integer convolution: exact, and what the deployed graph computes.

A `QConv2d` whose input and weight quantizers both produce code·step (LSQ, PACT: x_hat = q_x·s_x with q_x unsigned,
w_hat = q_w·s_w with q_w signed, per tensor or per output channel) computes

    y = float32(Σ q_x·q_w) · float32(s_x·s_w)        (one oneDNN int8 convolution, int32 accumulation)

instead of a float32 convolution of x_hat and w_hat. The sum of integer products is exact in any summation order,
so the forward does not depend on how a machine orders its sums, and it is the integer graph's own arithmetic
(`deploy.onnx_export`); the float32 convolution rounds every product and partial sum (~1e-7 relative). oneDNN is
handed the product s_x·s_w as the weight scale and 1 as the input's: given the two scales apart, its AMX kernels
multiply the sum by their product and its VNNI/AVX2 ones by one and then the other (one ulp apart on a third of the
outputs), while a single scale is applied the same way by every kernel. Its int8 kernels without VNNI sum pairs of
u8·s8 products in int16, which saturates beyond 2·Qp_x·|Qn_w| = 32,767: W8A8 convs (255·128·2) keep the float32
convolution on every machine, so that the choice does not depend on the CPU. It is also 3-6× faster on the CPU than
the float32 convolution it replaces, which is what brings the W2A2 training step level with the FP32 one
(benchmarks/NOTES.md). The backward is unchanged: `aten.convolution_backward` on the same float32 x_hat and w_hat
that autograd's convolution would use, bit for bit.

Where: float32 tensors on a CPU whose oneDNN has int8 convolutions (x86), autocast off (a bf16 run keeps its bf16
convolution), 4-D input, no bias, zero padding given as numbers, both quantizers of the code·step kind with at most
8 bits and 2·Qp_x·|Qn_w| ≤ 32,767, not calibrating. Elsewhere, and with `VAQKD_INT_CONV=0`, the float32
convolution as before. Either choice is part of the training arithmetic, which the fingerprints measure
(`engine.arithmetic`).

The codes: the fused activation kernels can write them beside x_hat (uint8, in x's memory format:
`Quantizer.with_codes`, `ste.LSQQuant(..., codes=True)`); otherwise they are recovered as round(x_hat·(1/s)), which
is q exactly (x_hat = fl(q·s) is within 2 ulp of q·s, far inside ±1/2 for q ≤ 255).
"""

from __future__ import annotations

import functools
import os
import platform

import torch


@functools.cache
def _ops_available() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    ops = getattr(torch.ops, "onednn", None)
    return all(hasattr(ops, n) for n in ("qconv_prepack", "qconv_pointwise")) if ops is not None else False


def enabled() -> bool:
    """Whether this process may take the integer forward at all (`VAQKD_INT_CONV=0` turns it off)."""
    return os.environ.get("VAQKD_INT_CONV", "1") != "0" and _ops_available()


def wanted(x: torch.Tensor) -> bool:
    """Whether a float32 tensor `x` here would reach the integer forward (device, dtype, autocast): where the
    fused activation kernels should also write the codes."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and enabled())  # fmt: skip


def _code_scale(q, signed: bool) -> torch.Tensor | None:
    """The quantizer's step where its output is code·step with codes of the wanted sign in 8 bits, else None."""
    step = q.code_step() if hasattr(q, "code_step") else None
    if step is None or q.signed != signed or q.bits > 8:
        return None
    return step


INT16_PAIR_MAX = 32767  # oneDNN's int8 kernels without VNNI add two u8·s8 products in int16 (saturating)


def module_ok(conv) -> bool:
    """Whether `conv` (a QConv2d) is of the kind the integer forward serves, whatever its input: no bias, zero
    padding given as numbers, code·step quantizers of at most 8 bits (unsigned input, signed weight) whose pairs of
    products fit in int16, not calibrating."""
    if conv.bias is not None or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    a, w = conv.a_quant, conv.w_quant
    if _code_scale(a, False) is None or _code_scale(w, True) is None:
        return False
    return 2 * a.qp * max(-w.qn, w.qp) <= INT16_PAIR_MAX


def applies(conv, x_hat: torch.Tensor, w_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(s_x, s_w) where `conv` (a QConv2d) takes the integer forward on these tensors, else None."""
    if x_hat.ndim != 4 or w_hat.dtype != torch.float32 or not wanted(x_hat) or not module_ok(conv):
        return None
    s_x, s_w = conv.a_quant.code_step(), conv.w_quant.code_step()
    if s_x.ndim != 0 or s_w.numel() not in (1, w_hat.shape[0]):
        return None
    return s_x, s_w


def codes_of(x_hat: torch.Tensor, s_x: torch.Tensor) -> torch.Tensor:
    """uint8 codes round(x_hat·(1/s_x)) (B, C, H, W), in x_hat's memory format."""
    return torch.round(x_hat * torch.reciprocal(s_x)).to(torch.uint8)


def _channels_last(t: torch.Tensor) -> bool:
    return t.ndim == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _memory_format(x: torch.Tensor, w: torch.Tensor) -> torch.memory_format:
    """F.conv2d's output format on the CPU: channels-last where the input or the weight is."""
    return torch.channels_last if _channels_last(x) or _channels_last(w) else torch.contiguous_format


class IntConv(torch.autograd.Function):
    """y = fl(Σ q_x·q_w)·fl(s_x·s_w) forward (oneDNN's int8 convolution with a float32 output); the float32
    convolution's own gradients backward (see the module docstring). `codes`: x's uint8 codes, or None to recover
    them from x_hat. The output in the memory format F.conv2d's would have."""

    @staticmethod
    def forward(ctx, x_hat, w_hat, codes, s_x, s_w, stride, padding, dilation, groups):
        stride, padding, dilation = list(stride), list(padding), list(dilation)
        with torch.no_grad():
            s_x, s_w = s_x.detach().float(), s_w.detach().float()
            qx = codes_of(x_hat, s_x) if codes is None else codes
            qw = torch.round(w_hat * torch.reciprocal(s_w)).to(torch.int8)  # (C_out, C_in/groups, kH, kW)
            c_out = w_hat.shape[0]
            # one scale, fl(s_x·s_w) per output channel, and 1 for the input: every oneDNN kernel then computes
            # fl(acc)·scale (see the module docstring)
            scales = (s_x * s_w).reshape(-1).expand(c_out).contiguous()
            zeros = torch.zeros(c_out, dtype=torch.long)
            packed = torch.ops.onednn.qconv_prepack(qw, scales, 1.0, 0, stride, padding, dilation, groups,
                                                    list(qx.shape))  # fmt: skip
            y = torch.ops.onednn.qconv_pointwise(qx, 1.0, 0, packed, scales, zeros, None, stride, padding, dilation,
                                                 groups, 1.0, 0, torch.float32, "none", [], "")  # fmt: skip
            y = y.contiguous(memory_format=_memory_format(x_hat, w_hat))
        ctx.save_for_backward(x_hat, w_hat)
        ctx.conf = (stride, padding, dilation, groups)
        return y

    @staticmethod
    def backward(ctx, dy):
        x_hat, w_hat = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False]
        dx, dw, _ = torch.ops.aten.convolution_backward(dy, x_hat, w_hat, None, stride, padding, dilation, False,
                                                        [0, 0], groups, mask)  # fmt: skip
        return dx, dw, None, None, None, None, None, None, None


def conv2d(conv, x_hat: torch.Tensor, w_hat: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
    """`conv`'s convolution of x_hat and w_hat (its bias and geometry): the integer forward where it applies, the
    float32 convolution elsewhere."""
    scales = applies(conv, x_hat, w_hat)
    if scales is None:
        return conv._conv_forward(x_hat, w_hat, conv.bias)
    return IntConv.apply(x_hat, w_hat, codes, *scales, conv.stride, conv.padding, conv.dilation, conv.groups)

