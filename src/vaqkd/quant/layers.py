"""Drop-in quantized layers: the FP32 weight stays the trained parameter; each forward quantizes the
weight once and the incoming activation once, then runs the op on the fake-quantized tensors — for a conv on the
CPU in float32, as the exact integer convolution of their codes (`quant.intconv`; the same gradients)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vaqkd.quant import intconv


class QConv2d(nn.Conv2d):
    def __init__(self, conv: nn.Conv2d, w_quant: nn.Module, a_quant: nn.Module):
        super().__init__(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )  # fmt: skip
        self.load_state_dict(conv.state_dict())
        self.w_quant, self.a_quant = w_quant, a_quant

    @property
    def input_clamps_at_zero(self) -> bool:
        """True when the input quantizer maps every x <= 0 to 0 with zero gradient (a preceding ReLU is a no-op)."""
        return bool(getattr(self.a_quant, "clamps_at_zero", False))

    @property
    def w_bits(self) -> int:
        return getattr(self.w_quant, "bits", 32)

    @property
    def a_bits(self) -> int:
        return getattr(self.a_quant, "bits", 32)

    def wants_codes(self, x: torch.Tensor) -> bool:
        """Whether this conv would read its input's codes (the integer forward, `quant.intconv`): then its input
        quantizer should write them beside x_hat where it can (`Quantizer.with_codes`). Not where the quantizer
        has forward hooks (or any module has, globally): those must see it called as a module."""
        return intconv.module_ok(self) and intconv.wanted(x) and not _hooked(self.a_quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wants_codes(x):
            return self.forward_quantized(*self.a_quant.with_codes(x))
        return self.forward_quantized(self.a_quant(x))

    def forward_quantized(self, x_hat: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """The convolution of an input already quantized by this layer's `a_quant` (e.g. fused with a ReLU);
        `codes`: its uint8 codes where the quantizer wrote them (else the integer forward recovers them)."""
        return intconv.conv2d(self, x_hat, self.w_quant(self.weight), codes)


class QLinear(nn.Linear):
    def __init__(self, fc: nn.Linear, w_quant: nn.Module, a_quant: nn.Module):
        super().__init__(
            fc.in_features, fc.out_features, fc.bias is not None, device=fc.weight.device, dtype=fc.weight.dtype
        )
        self.load_state_dict(fc.state_dict())
        self.w_quant, self.a_quant = w_quant, a_quant

    w_bits = QConv2d.w_bits
    a_bits = QConv2d.a_bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.a_quant(x), self.w_quant(self.weight), self.bias)


def _hooked(m: nn.Module) -> bool:
    """Whether `m` has forward (pre-)hooks, or every module has, globally."""
    from torch.nn.modules import module as mod

    return bool(m._forward_hooks or m._forward_pre_hooks or mod._global_forward_hooks
                or mod._global_forward_pre_hooks)  # fmt: skip
