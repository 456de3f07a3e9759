"""The residual stream as part of the quantization policy: `quant.residual = "int"`.

A float-residual block (the paper's, `quant.residual = "float"`) quantizes only what its convs read: the shortcut
carries the unquantized block output, so an integer graph must keep the add, and the conv that feeds it, in
floating point. An integer-residual block computes, with x the previous block's output (B, C, H, W):

    x_s  = Q_stream(x)                    the stream: codes of `residual_bits` bits, one learned step
    a    = conv1(x_s)                     (x_s *is* conv1's 2-bit input where residual_bits = a_bits)
    m    = Q_mid(bn2(conv2(relu(bn1 a)))) the conv output requantized to signed 8-bit codes (MID_BITS)
    out  = relu(m + shortcut(x_s))        option-A shortcut on the codes (stride 2, zero channels)

and the next block's Q_stream turns `out` into codes again. Every tensor that crosses a layer is a code times a
step, so the ONNX graph (`deploy.onnx_export`) runs every block conv as an integer conv and every add as an
integer add, and it computes exactly this arithmetic: what is trained is what is deployed (the only differences
are float rounding, measured by the agreement figures). With `residual_bits = a_bits` the stream quantizer is
conv1's own input quantizer (one step serves the conv and the shortcut); with wider streams (4 or 8 bits) the
block has its own `stream_quant` and conv1 requantizes the stream to its 2-bit codes. The last block's output goes
to the average pool unquantized (the FC is FP32 by the default policy).

`install_int_residual(model, bits)` after `quantize()` turns every quantized BasicBlock of a CIFAR ResNet into
an `IntResidualBlock` (in place; new quantizers `mid_quant` and, for a wide stream, `stream_quant`; the existing
state-dict keys unchanged); they need `calibrate` like every other quantizer. Each stage becomes an `IntStage`,
the fast path: within a stage a block hands the next one its stream codes, made together with its own end
(Q_mid, add, ReLU, the next Q_stream: `quant.ste.IntEndQuant`, one pass each way); the same numbers as the blocks
run one by one, which is what a stage with hooks, a traced one and a calibrating one do.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from vaqkd.models.resnet_cifar import BasicBlock
from vaqkd.quant.fusion import FastStage, FusedStage, _hooked
from vaqkd.quant.layers import QConv2d
from vaqkd.quant.quantizers import LSQQuantizer, Quantizer
from vaqkd.quant.ste import FUSE_MIN_NUMEL, IntAddQuant, IntEndQuant

MID_BITS = 8  # the requantization of conv2's output before the add: signed 8-bit codes (uint8 at zero point 128)
RESIDUAL_MODES = ("float", "int")


class IntResidualBlock(BasicBlock):
    """A quantized BasicBlock whose input, shortcut and conv output are codes (see the module docstring)."""

    mid_quant: LSQQuantizer

    @property
    def stream(self) -> Quantizer:
        """The quantizer of the block's input: the codes conv1 reads and the shortcut carries."""
        return self.stream_quant if hasattr(self, "stream_quant") else self.conv1.a_quant

    def act_quantizers(self) -> list[Quantizer]:
        return [self.mid_quant, *([self.stream_quant] if hasattr(self, "stream_quant") else [])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_s = self.stream(x)  # (B, C, H, W): codes·step
        # traced for export or watched by hooks (the size/BOPs dry run, features by module path), conv1 runs as one
        # layer (its quantizer is idempotent on its own codes)
        y = self._body(x_s, is_fx_symbolic_tracing() or _hooked(self))
        return F.relu(self.mid_quant(y) + self.shortcut(x_s))

    def _body(self, x_s: torch.Tensor, whole_conv1: bool = False, codes: torch.Tensor | None = None) -> torch.Tensor:
        """bn2(conv2(...(conv1(x_s)))): the conv branch before Q_mid. conv1 requantizes a wide stream to its own
        codes; a 2-bit stream is its input already (`codes`: its uint8 codes, where made)."""
        if hasattr(self, "stream_quant") or whole_conv1:
            a = self.conv1(x_s)
        else:
            a = self.conv1.forward_quantized(x_s, codes)
        out = self.bn1(a)
        if not self.conv2.input_clamps_at_zero:
            out = F.relu(out)
        return self.bn2(self.conv2(out))

    def forward_codes(self, x_s: torch.Tensor, codes: torch.Tensor | None, nxt: IntResidualBlock | None):
        """From this block's stream `x_s` (`IntStage`; `codes`: its uint8 codes where made, else None): the next
        block's, (x_next, its codes or None) with x_next = Q_stream(relu(Q_mid(y) + shortcut)), or with `nxt` None
        (the stage's last block) (the block's output, None); the block's end (and the next stream quantizer) in
        one fused pass where the quantizers have the kernel, else one by one. The codes are made where the next
        block's conv1 reads its stream directly and takes the integer forward (`quant.intconv`)."""
        y, sc = self._body(x_s, codes=codes), self.shortcut(x_s)
        mid, q = self.mid_quant, (None if nxt is None else nxt.stream)
        if not (_fusable(mid) and y.numel() >= FUSE_MIN_NUMEL):
            h = F.relu(mid(y) + sc)
            return (h, None) if q is None else (q(h), None)
        g_mid = 1.0 / math.sqrt(y.numel() * mid.grad_batch * mid.qp)
        if q is None:
            return IntAddQuant.apply(y, sc, mid.step, mid.qn, mid.qp, g_mid), None
        if _fusable(q) and not q.signed:
            g_next = 1.0 / math.sqrt(y.numel() * q.grad_batch * q.qp)
            args = (y, sc, mid.step, q.step, mid.qn, mid.qp, q.qp, g_mid, g_next)
            if q is nxt.conv1.a_quant and nxt.conv1.wants_codes(y):  # (wants_codes: q's codes fit in 8 bits)
                return IntEndQuant.apply(*args, True)
            return IntEndQuant.apply(*args), None
        return q(IntAddQuant.apply(y, sc, mid.step, mid.qn, mid.qp, g_mid)), None


def _fusable(q: Quantizer) -> bool:
    return isinstance(q, LSQQuantizer) and not q.calibrating and not q.per_channel


class IntStage(FastStage):
    """A stage of `IntResidualBlock`s run on the fast path (see the module docstring); state-dict keys are the
    nn.Sequential's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = list(self)
        if is_fx_symbolic_tracing() or _hooked(self) or any(b.stream.calibrating for b in blocks):
            for b in blocks:  # hooks must see every module's output, a trace every layer: block by block
                x = b(x)
            return x
        first = blocks[0]
        if first.stream is first.conv1.a_quant and first.conv1.wants_codes(x):
            x_s, codes = first.stream.with_codes(x)
        else:
            x_s, codes = first.stream(x), None
        for b, nxt in zip(blocks, [*blocks[1:], None]):
            x_s, codes = b.forward_codes(x_s, codes, nxt)
        return x_s  # the last block's output


def _blocks(model: nn.Module) -> list[BasicBlock]:
    return [m for m in model.modules() if isinstance(m, BasicBlock)]


def install_int_residual(model: nn.Module, bits: int = 2) -> nn.Module:
    """Make the residual stream of a quantized CIFAR ResNet integer (in place); returns the model. `bits`: the
    stream's width (the conv input's a_bits, or wider)."""
    from vaqkd.errors import ConfigError

    blocks = _blocks(model)
    if not blocks:
        raise ConfigError(f"quant.residual = int: {type(model).__name__} has no CIFAR ResNet blocks (CIFAR ResNets "
                          "only; use quant.residual = float)")  # fmt: skip
    for b in blocks:
        if not (isinstance(b.conv1, QConv2d) and isinstance(b.conv2, QConv2d)):
            raise ConfigError("quant.residual = int: every block's convs must be quantized")
        if not isinstance(b.conv1.a_quant, LSQQuantizer) or not isinstance(b.conv2.a_quant, LSQQuantizer):
            raise ConfigError(f"quant.residual = int: needs LSQ activations, got {type(b.conv1.a_quant).__name__}")
        a_bits = b.conv1.a_quant.bits
        if bits < a_bits:
            raise ConfigError(f"quant.residual_bits = {bits}: narrower than the convs' input ({a_bits} bits)")
        device = b.conv1.weight.device
        b.__class__ = IntResidualBlock
        b.mid_quant = LSQQuantizer(MID_BITS, signed=True).to(device)
        if bits != a_bits:
            b.stream_quant = LSQQuantizer(bits, signed=False).to(device)
    for m in list(model.modules()):
        if type(m) in (nn.Sequential, FusedStage) and len(m) and all(isinstance(b, IntResidualBlock) for b in m):
            m.__class__ = IntStage
    return model


def residual_mode(model: nn.Module) -> tuple[str, int | None]:
    """("int", stream bits) for a model with an integer residual stream, else ("float", None)."""
    blocks = [b for b in _blocks(model) if isinstance(b, IntResidualBlock)]
    return ("int", blocks[0].stream.bits) if blocks else ("float", None)
