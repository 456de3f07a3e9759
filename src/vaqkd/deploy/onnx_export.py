"""Integer inference: any quantized (or FP32) model as an ONNX QDQ graph, built from its traced graph.

    vaqkd export RUN_DIR | ARTIFACT | pretrained --format onnx --out model.onnx

The model is traced with torch.fx down to its layers (`_Tracer`: convs, linears, BatchNorm, quantizers, ReLU,
pools) and each node is mapped: a quantizer to QuantizeLinear -> Clip(Qn, Qp) (its codes and clamp, exactly; a
signed quantizer's codes as uint8 at zero point 128), a conv to Conv with the BatchNorm after it folded in, an add,
ReLU, strided slice, zero pad, global pool, flatten and linear to their ops; a module or function with no mapping is
one ExportError naming its path. CIFAR ResNets (float or integer residual), the WRNs and a plain nn.Sequential
export the same way; so does the FP32 teacher, the graph every speed figure compares against.

The input is uint8 pixels: the graph normalises inside with the loader's arithmetic ((x − mean·255)/(std·255) in
float32, `normalisation`), so a consumer feeds images and needs no formula of its own. IR version 10 (what opset 21
needs: later versions are refused by ORT ≤ 1.24 and by the OpenVINO provider).

Where a quantized conv's output goes only into one quantizer (through ReLUs an unsigned quantizer absorbs), it is
the pattern DQ -> Conv(DQ weights, int32 bias) -> Q that ORT fuses into QLinearConv: uint8 x int8 products, int32
accumulation, one requantization. Its weights are int8 codes behind a per-output-channel scale that carries the
LSQ step and the folded BatchNorm (γ/σ; a channel with γ < 0 has its codes negated, so every scale is positive),
with the BatchNorm shift as the int32 bias at scale s_in·s_w. At 2 bits the rounding of that shift is what decides
agreement (every output of a channel moves by the same error, codes near a boundary flip, the flips cascade:
`benchmarks/onnx_bias_grid.py` measured 88.1 % agreement on one coarse grid), so the grid is made fine: the input
codes are spread over 8 bits (code·k at step/k, k = 43 for 2 bits) and the weight codes scaled by an m in 1..63
chosen per channel to hold the shift most closely (`_bias_multipliers`), with k·m small enough that no u8·s8 pair
overflows int16 (x86 without VNNI sums pairs with vpmaddubsw, which saturates; a signed input's uint8 operand is
128 + code·k, so the signed stem of `first_last = "same"` gets k = 1). A layer no integer kernel computes exactly
(8-bit inputs times 8-bit weights: a W8A8 stem or classifier), or whose BatchNorm shift no int32 holds (γ ≈ 0),
stays float on a sealed input (Cast, Sub, Mul in place of DequantizeLinear), which ORT's optimiser cannot make
integer behind our back. Two adds of codes followed by a
quantizer (DQ, DQ -> Add -> Q) are fused by ORT into QLinearAdd.

The residual stream decides how much is integer. A float-residual student (`quant.residual = "float"`, the
paper's) adds the unquantized shortcut to its second conv's output, so that conv, the add and the ReLU stay float
(float convs on the exact 2-bit values, dequantized weights as constants ORT can prepack); an integer-residual
student (`"int"`, `vaqkd.quant.residual`) computes codes everywhere, and its optimised graph has no float conv
but the FP32 stem (and a float FC, by policy), no float add but the last block's. ORT requantizes with a float
multiplier and rounds half to even, so a value on a rounding boundary can land on the other code than in PyTorch:
agreement is measured (benchmarks/deploy_onnx.py), not assumed. Wider students export, but the bias grid is
coarser there (at 4 bits ~135x finer only): measure their agreement before relying on it.
"""

from __future__ import annotations

import copy
import operator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from vaqkd.deploy.artifact import ExportError, weight_codes
from vaqkd.errors import RunFileError

OPSET = 21
IR_VERSION = 10  # what opset 21 needs; later IR versions are refused by ORT <= 1.24 and OpenVINO's provider


class _Graph:
    def __init__(self):
        import onnx  # optional extra: pip install vaqkd[deploy]

        self.onnx = onnx
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        self.inits.append(self.onnx.numpy_helper.from_array(np.array(array, order="C"), name))  # 0-d stays 0-d
        return name

    def op(self, op: str, inputs: list[str], base: str | None = None, **attrs) -> str:
        out = self.name(base or op.lower())
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out


def _bn_fold(bn: nn.BatchNorm2d) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) per channel with BN(y) = scale·y + shift, in float64 then float32."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    scale = bn.weight.detach().double() / torch.sqrt(var + bn.eps)
    shift = bn.bias.detach().double() - mean * scale
    return scale.numpy(), shift.numpy()


def _act_step(q: nn.Module) -> float:
    from vaqkd.quant import LSQQuantizer, PACTQuantizer

    if isinstance(q, PACTQuantizer):
        return float(q.alpha.detach()) / (2**q.bits - 1)
    if isinstance(q, LSQQuantizer) and not q.per_channel:
        return float(q.step.detach())
    raise ExportError(f"{type(q).__name__} activations cannot be exported to ONNX (LSQ or PACT only)")


INT16_PAIR = 16383  # |a|·|w| bound: u8·s8 pairs summed in int16 (vpmaddubsw, x86 without VNNI) cannot saturate


def _input_spread(q: nn.Module, w_span: int) -> int:
    """How far a fused conv's input codes are spread (code·k at step/k): as far as 8 bits allow while every
    product with the weight codes (scaled by up to 127 // w_span) stays within `INT16_PAIR`."""
    a_max = q.qp if not q.signed else max(-q.qn, q.qp)
    w_max = w_span * max(127 // w_span, 1)
    if q.signed:  # the uint8 operand is 128 + code·k (zero point 128): its magnitude reaches 128 + a_max·k
        return max(1, min(127 // a_max, (INT16_PAIR // w_max - 128) // a_max))
    return max(1, min(255 // a_max, INT16_PAIR // (a_max * w_max)))


def _exact_in_int16(layer: nn.Module) -> bool:
    """Whether an integer kernel computes the layer exactly: every u8·s8 product pair of its input codes (uint8,
    at zero point 128 where signed) and weight codes fits `INT16_PAIR`. 8-bit inputs times 8-bit weights (a W8A8
    stem or classifier, `first_last = "8"`) do not: ORT's optimiser, given DQ -> Conv -> Q, makes such a layer an
    integer kernel (quantizing its float weights itself where they are float), and its codes moved on this x86
    without VNNI (agreement with PyTorch fell to 52-81 % on a test ResNet-20). Such layers stay float, sealed
    (`_Builder.float_sealed`)."""
    a, w = layer.a_quant, layer.w_quant
    a_top = a.qp if not a.signed else 128 + max(-a.qn, a.qp)
    return a_top * max(-w.qn, w.qp) <= INT16_PAIR


def _bias_multipliers(shift: np.ndarray, unit: np.ndarray, m_max: int) -> np.ndarray:
    """Per output channel, the weight multiplier m in 1..m_max whose int32 bias grid (unit / m) holds the
    BatchNorm shift most closely: the error |shift − round(shift·m/unit)·unit/m| is what QLinearConv adds to
    every output of the channel, and at 2 bits it moves codes that lie near a rounding boundary."""
    ms = np.arange(1, m_max + 1)
    grid = (unit[:, None] / ms[None, :]).astype(np.float32).astype(np.float64)  # as b_scale below
    with np.errstate(divide="ignore", invalid="ignore"):  # a channel of scale 0 (γ = 0): no grid, any m
        err = np.abs(shift[:, None] - np.round(shift[:, None] / grid) * grid)
    return ms[np.argmin(np.nan_to_num(err, nan=np.inf), axis=1)]


class _Tracer(fx.Tracer):
    """Traces down to the layers the exporter maps (convs, linears, BatchNorm, quantizers, ReLU, pools) and records
    the output node of every other module by its path (`build_onnx(..., stop_after=...)`)."""

    LEAVES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity,
              nn.Dropout)  # fmt: skip

    def __init__(self):
        super().__init__()
        self.outputs: dict[str, fx.Node] = {}
        self._where: list[tuple[str, str]] = [("", "the model")]  # (module path, type) being traced

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta["scope"] = self._where[-1]
        return node

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from vaqkd.quant import Quantizer

        return isinstance(m, (*self.LEAVES, Quantizer)) or (type(m) is nn.Sequential and not len(m))

    def call_module(self, m, forward, args, kwargs):
        self._where.append((self.path_of_module(m), type(m).__name__))
        try:
            out = super().call_module(m, forward, args, kwargs)
        finally:
            self._where.pop()
        if not self.is_leaf_module(m, "") and isinstance(out, fx.Proxy):
            self.outputs[self.path_of_module(m)] = out.node
        return out


class _Value:
    """What a traced tensor is in the graph: a float tensor, or integer codes (uint8 at zero point `zp`) of the
    quantizer `q` with step `step`, dequantized on demand (`_Graph.float`)."""

    def __init__(self, name: str | None = None, codes: str | None = None, q=None, step: float = 0.0, zp: int = 0):
        self.name, self.codes, self.q, self.step, self.zp = name, codes, q, step, zp


def _is_relu(n: fx.Node, modules) -> bool:
    return ((n.op == "call_function" and n.target in (F.relu, torch.relu)) or (n.op == "call_method" and
            n.target == "relu") or (n.op == "call_module" and isinstance(modules[n.target], nn.ReLU)))  # fmt: skip


def _consumer_quants(n: fx.Node, modules) -> list:
    """The activation quantizers that read node n's output (through ReLUs, which an unsigned quantizer absorbs);
    None for any other reader."""
    from vaqkd.quant import QConv2d, QLinear, Quantizer

    out = []
    for u in n.users:
        m = modules.get(u.target) if u.op == "call_module" else None
        if _is_relu(u, modules):
            qs = _consumer_quants(u, modules)
            out += [q if q is not None and q.clamps_at_zero else None for q in qs] or [None]
        elif isinstance(m, Quantizer):
            out.append(m)
        elif isinstance(m, (QConv2d, QLinear)):
            out.append(m.a_quant)
        else:
            out.append(None)
    return out


class _Builder:
    def __init__(self, gm: fx.GraphModule, integer: bool):
        self.g, self.gm, self.integer = _Graph(), gm, integer
        self.stop: fx.Node | None = None  # build_onnx(stop_after=...): the node whose output the graph gives
        self.modules = dict(gm.named_modules())
        self.env: dict[fx.Node, _Value] = {}
        self.folded: set[fx.Node] = set()  # BatchNorm nodes folded into the conv before them

    # --- values ---------------------------------------------------------------------------------------------
    def float(self, v: _Value) -> str:
        if v.name is None:
            g = self.g
            v.name = g.op("DequantizeLinear", [v.codes, g.const("a_scale", np.array(v.step, np.float32)),
                                               g.const("a_zp", np.array(v.zp, np.uint8))], "a_hat")  # fmt: skip
        return v.name

    def float_sealed(self, v: _Value) -> str:
        """v's values as floats computed as DequantizeLinear does, (code − zp)·step, but by Cast, Sub and Mul: no
        runtime's QDQ pass sees a DQ there to fuse the layer after it into an integer kernel (for the layers whose
        8-bit products an integer kernel would not keep exactly: `_exact_in_int16`)."""
        if v.codes is None:
            return self.float(v)
        from onnx import TensorProto

        g = self.g
        x = g.op("Cast", [v.codes], "a_float", to=TensorProto.FLOAT)
        x = g.op("Sub", [x, g.const("a_zp_f", np.array(v.zp, np.float32))], "a_centred")
        return g.op("Mul", [x, g.const("a_scale", np.array(v.step, np.float32))], "a_hat")

    def quant(self, v: _Value, q) -> _Value:
        """Q -> Clip(Qn, Qp) of the quantizer q: its codes and clamp (a signed quantizer's codes as uint8 at zero
        point 128). Codes of q already are q's codes. QuantizeLinear computes x / s where PyTorch computes
        x · (1/s): a value within an ulp of a rounding boundary can land on the neighbouring code (ties themselves
        round half to even in both)."""
        if v.q is q:
            return v
        s, zp = _act_step(q), (128 if q.signed else 0)
        g = self.g
        codes = g.op("QuantizeLinear", [self.float(v), g.const("a_scale", np.array(s, np.float32)),
                                        g.const("a_zp", np.array(zp, np.uint8))], "a_codes")  # fmt: skip
        if (zp + q.qn, zp + q.qp) != (0, 255):  # an 8-bit quantizer's clamp is QuantizeLinear's saturation
            codes = g.op("Clip", [codes, g.const("qn", np.array(zp + q.qn, np.uint8)),
                                  g.const("qp", np.array(zp + q.qp, np.uint8))])  # fmt: skip
        return _Value(codes=codes, q=q, step=s, zp=zp)

    def add_operand(self, v: _Value) -> str:
        """An add's operand. Signed codes (a conv's output requantized before the add: the integer residual's
        `mid_quant`) are dequantized through a second identical Q -> DQ: ORT removes the repeated pair and still
        fuses DQ, DQ -> Add -> Q into QLinearAdd, and OpenVINO, which fuses conv, requantization, add and the
        next quantizer into one integer conv, otherwise leaves the requantization out (2 % of the block's output
        codes moved, measured on a ResNet-20; with the pair repeated: none)."""
        if v.codes is None or v.zp == 0:
            return self.float(v)
        g = self.g
        scale, zp = g.const("a_scale", np.array(v.step, np.float32)), g.const("a_zp", np.array(v.zp, np.uint8))
        again = g.op("QuantizeLinear", [self.float(v), scale, zp], "a_codes")
        return g.op("DequantizeLinear", [again, scale, zp], "a_hat")

    # --- layers -----------------------------------------------------------------------------------------------
    def conv(self, node: fx.Node, conv: nn.Conv2d, v: _Value) -> _Value:
        """BN(conv(x)) with the BatchNorm after it folded in. Where its output goes only into one quantizer, the
        QLinearConv pattern DQ -> Conv(DQ weights, int32 bias) -> Q (ORT fuses it into an integer kernel)."""
        from vaqkd.quant import QConv2d

        g, c_out = self.g, conv.out_channels
        users = list(node.users)
        bn = None
        if len(users) == 1 and users[0].op == "call_module" and isinstance(self.modules[users[0].target],
                                                                           nn.BatchNorm2d):  # fmt: skip
            bn, out_node = self.modules[users[0].target], users[0]
            self.folded.add(out_node)
        else:
            out_node = node
        scale, shift = _bn_fold(bn) if bn is not None else (np.ones(c_out), np.zeros(c_out))
        if conv.bias is not None:
            shift = shift + scale * conv.bias.detach().double().numpy()
        attrs = dict(kernel_shape=list(conv.kernel_size), strides=list(conv.stride), dilations=list(conv.dilation),
                     pads=[conv.padding[0], conv.padding[1]] * 2, group=conv.groups)  # fmt: skip
        if not isinstance(conv, QConv2d):
            w = g.const("w", (conv.weight.detach().double().numpy() * scale[:, None, None, None]).astype(np.float32))
            y = g.op("Conv", [self.float(v), w, g.const("bias", shift.astype(np.float32))], "conv", **attrs)
            return _Value(y)
        v = self.quant(v, conv.a_quant)
        codes, qn = weight_codes(conv)
        q = (codes + qn).numpy().astype(np.int64)  # (C_out, C_in, k, k), in [Qn, Qp]
        span = max(-qn, conv.w_quant.qp)
        readers = _consumer_quants(out_node, self.modules)
        exact = _exact_in_int16(conv)
        fused = (self.integer and exact and len(readers) > 0
                 and all(r is readers[0] and r is not None for r in readers))  # fmt: skip
        # input codes spread over 8 bits (code·k at step/k): a k times finer int32 bias grid
        k = _input_spread(conv.a_quant, span) if fused else 1
        s_in = float(np.float32(v.step) / np.float32(k)) if k > 1 else v.step
        s_w = conv.w_quant.step.detach().double().reshape(-1).numpy() * np.ones(c_out)
        ch_scale = s_w * scale
        # codes x m at scale/m: the same weights, and the int32 bias m times finer; per channel the m in 1..m_max
        # whose grid holds the BN shift best (`_bias_multipliers`), with every u8·s8 pair within `INT16_PAIR`.
        # Codes are negated where γ < 0 (every scale positive); 8-bit codes cannot be negated in int8: they keep a
        # negative scale.
        a = conv.a_quant
        u8_top = (128 if a.signed else 0) + k * (max(-a.qn, a.qp) if a.signed else a.qp)  # the uint8 operand's top
        m_max = max(min(127 // span, INT16_PAIR // (u8_top * span)), 1) if fused else max(127 // span, 1)
        sign = np.where(ch_scale < 0, -1, 1) if span * m_max <= 127 else np.ones(c_out, np.int64)
        m = _bias_multipliers(shift, s_in * np.abs(ch_scale), m_max) if fused else np.full(c_out, m_max, np.int64)
        q = q * (sign * m)[:, None, None, None]
        ch_scale = ch_scale * sign / m
        b_scale = (s_in * ch_scale).astype(np.float32)  # int32 bias at scale s_in·s_w, as QLinearConv requires
        with np.errstate(divide="ignore", invalid="ignore"):
            b_int = np.round(shift / b_scale.astype(np.float64))
        overflow = fused and not (np.isfinite(b_int).all() and np.abs(b_int).max() <= 2**31 - 1)
        if overflow:  # a channel whose γ is ~0 (a channel training switched off): its shift is no int32 on that
            fused = False  # grid (it wrapped to −2³¹); the layer stays float, sealed so no optimiser makes it integer
        x = self.float_sealed(v) if overflow or not (exact and self.integer) else self.float(v)
        if k > 1 and fused:
            sc, zp = g.const("a_scale", np.array(s_in, np.float32)), g.const("a_zp", np.array(v.zp, np.uint8))
            x = g.op("DequantizeLinear", [g.op("QuantizeLinear", [x, sc, zp], "a_codes"), sc, zp], "a_hat")
        if fused:
            w = g.op("DequantizeLinear", [g.const("w_codes", q.astype(np.int8)),
                                          g.const("w_scale", ch_scale.astype(np.float32)),
                                          g.const("w_zp", np.zeros(c_out, np.int8))], "w_hat", axis=0)  # fmt: skip
            bias = g.op("DequantizeLinear", [g.const("b_codes", b_int.astype(np.int32)), g.const("b_scale", b_scale),
                                             g.const("b_zp", np.zeros(c_out, np.int32))], "b_hat", axis=0)  # fmt: skip
        else:  # a float conv on the exact codes: dequantized weights as a constant ORT can prepack
            w = g.const("w_hat", q.astype(np.float32) * ch_scale.astype(np.float32)[:, None, None, None])
            bias = g.const("bias", shift.astype(np.float32))
        return _Value(g.op("Conv", [x, w, bias], "conv", **attrs))

    def linear(self, fc: nn.Linear, v: _Value) -> _Value:
        from vaqkd.quant import QLinear

        g = self.g
        x = None
        if isinstance(fc, QLinear):
            v = self.quant(v, fc.a_quant)
            codes, qn = weight_codes(fc)
            s_w = fc.w_quant.step.detach().float().reshape(-1).numpy() * np.ones(fc.out_features, np.float32)
            if _exact_in_int16(fc):
                zp, scale = g.const("w_zp", np.zeros(fc.out_features, np.int8)), g.const("w_scale", s_w)
                w = g.op("DequantizeLinear", [g.const("w_codes", (codes + qn).numpy().astype(np.int8)), scale, zp],
                         "w_hat", axis=0)  # fmt: skip
            else:  # 8-bit x 8-bit: float weights of the exact codes, on a sealed float input
                w = g.const("w_hat", (codes + qn).numpy().astype(np.float32) * s_w[:, None])
                x = self.float_sealed(v)
        else:
            w = g.const("w", fc.weight.detach().float().numpy())
        b = fc.bias.detach().float().numpy() if fc.bias is not None else np.zeros(fc.out_features, np.float32)
        return _Value(g.op("Gemm", [x or self.float(v), w, g.const("b", b)], "gemm", transB=1))

    def batchnorm(self, bn: nn.BatchNorm2d, v: _Value) -> _Value:
        scale, shift = _bn_fold(bn)
        g = self.g
        shape = (1, -1, 1, 1)
        y = g.op("Mul", [self.float(v), g.const("bn_scale", scale.astype(np.float32).reshape(shape))])
        return _Value(g.op("Add", [y, g.const("bn_shift", shift.astype(np.float32).reshape(shape))]))

    def slice(self, v: _Value, index) -> _Value:
        """x[:, :, a:b:c, ...] on codes (so a strided shortcut stays integer) or floats."""
        index = index if isinstance(index, tuple) else (index,)
        starts, ends, axes, steps = [], [], [], []
        for axis, sl in enumerate(index):
            if not isinstance(sl, slice):
                raise ExportError(f"indexing with {sl!r}: only slices export")
            if sl == slice(None):
                continue
            starts.append(sl.start or 0)
            ends.append(2**62 if sl.stop is None else sl.stop)
            axes.append(axis)
            steps.append(sl.step or 1)
        g = self.g
        ins = [g.const(n, np.array(a, np.int64))
               for n, a in (("st", starts), ("en", ends), ("ax", axes), ("sp", steps))]  # fmt: skip
        if v.codes is not None:
            return _Value(codes=g.op("Slice", [v.codes, *ins]), q=v.q, step=v.step, zp=v.zp)
        return _Value(g.op("Slice", [v.name, *ins]))

    def pad(self, v: _Value, pads, mode: str = "constant", value=None) -> _Value:
        if mode != "constant" or value not in (None, 0, 0.0):
            raise ExportError(f"F.pad(mode={mode!r}, value={value!r}): only zero padding exports")
        pads = list(pads)
        if len(pads) % 2:
            raise ExportError(f"F.pad({pads}): pads come in pairs")
        nd = 4
        begin, end = [0] * nd, [0] * nd
        for i in range(len(pads) // 2):  # F.pad lists the last dimension first
            begin[nd - 1 - i], end[nd - 1 - i] = pads[2 * i], pads[2 * i + 1]
        g = self.g
        p = g.const("pads", np.array(begin + end, np.int64))
        if v.codes is not None:  # zero padding of codes is the code of zero (the zero point)
            out = g.op("Pad", [v.codes, p, g.const("pad_zp", np.array(v.zp, np.uint8))], mode="constant")
            return _Value(codes=out, q=v.q, step=v.step, zp=v.zp)
        return _Value(g.op("Pad", [v.name, p], mode="constant"))

    # --- the walk -------------------------------------------------------------------------------------------
    def value(self, a) -> _Value:
        if not isinstance(a, fx.Node):
            raise ExportError(f"a constant {a!r} where a tensor was expected")
        return self.env[a]

    def node(self, n: fx.Node) -> _Value:
        from vaqkd.quant import Quantizer

        g, mods = self.g, self.modules
        if n.op == "call_module":
            m = mods[n.target]
            x = self.value(n.args[0])
            if n in self.folded:
                return x
            if isinstance(m, Quantizer):
                return self.quant(x, m)
            if isinstance(m, nn.Conv2d):
                return self.conv(n, m, x)
            if isinstance(m, nn.Linear):
                return self.linear(m, x)
            if isinstance(m, nn.BatchNorm2d):
                return self.batchnorm(m, x)
            if isinstance(m, nn.ReLU):
                return self.relu(n, x)
            if isinstance(m, nn.AdaptiveAvgPool2d):
                return self.pool(m.output_size, x)
            if isinstance(m, nn.Flatten):
                return self.flatten(x, m.start_dim, m.end_dim)
            if isinstance(m, (nn.Identity, nn.Dropout, nn.Sequential)):
                return x
            raise ExportError(f"{n.target} ({type(m).__name__}): no ONNX mapping for this module")
        if n.op in ("call_function", "call_method"):
            t = n.target
            name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
            if _is_relu(n, mods):
                return self.relu(n, self.value(n.args[0]))
            if t in (operator.add, torch.add) or name == "add":
                a, b = (self.value(v) for v in n.args[:2])
                return _Value(g.op("Add", [self.add_operand(a), self.add_operand(b)]))
            if t is operator.getitem and isinstance(n.args[0], fx.Node):
                return self.slice(self.value(n.args[0]), n.args[1])
            if t is F.pad:
                args = [*n.args[1:]]
                return self.pad(self.value(n.args[0]), args[0] if args else n.kwargs["pad"],
                                n.kwargs.get("mode", args[1] if len(args) > 1 else "constant"),
                                n.kwargs.get("value", args[2] if len(args) > 2 else None))  # fmt: skip
            if t in (F.adaptive_avg_pool2d,):
                return self.pool(n.args[1] if len(n.args) > 1 else n.kwargs["output_size"], self.value(n.args[0]))
            if t is torch.flatten or name == "flatten":
                start = n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 0)
                end = n.args[2] if len(n.args) > 2 else n.kwargs.get("end_dim", -1)
                return self.flatten(self.value(n.args[0]), start, end)
            path, kind = n.meta.get("scope", ("", "the model"))
            raise ExportError(f"{path or 'forward'} ({kind}): no ONNX mapping for {name}")
        raise ExportError(f"{n.name}: a {n.op} node does not export")

    def relu(self, n: fx.Node, v: _Value) -> _Value:
        """ReLU; left out where every reader is an unsigned quantizer (its clamp at 0 is the ReLU), so the add
        or conv before it meets QuantizeLinear directly and ORT fuses the pair into an integer kernel."""
        qs = _consumer_quants(n, self.modules)
        absorbed = qs and all(q is not None and q.clamps_at_zero for q in qs)
        if self.integer and absorbed and v.codes is None and n is not self.stop:  # a stage's output: as it is
            return v
        if v.codes is not None and v.zp == 0:
            return v  # codes of an unsigned quantizer are >= 0 already
        return _Value(self.g.op("Relu", [self.float(v)]))

    def pool(self, size, v: _Value) -> _Value:
        if size not in (1, (1, 1), [1, 1]):
            raise ExportError(f"adaptive average pool to {size}: only a global pool (output size 1) exports")
        return _Value(self.g.op("GlobalAveragePool", [self.float(v)]))

    def flatten(self, v: _Value, start: int, end: int) -> _Value:
        if (start, end) != (1, -1):
            raise ExportError(f"flatten({start}, {end}): only flatten(x, 1) exports")
        return _Value(self.g.op("Flatten", [self.float(v)], axis=1))


def _trace(model: nn.Module) -> tuple[fx.GraphModule, dict[str, fx.Node]]:
    """The model's fx graph at the level of its layers (a copy of the model with the float residual stages'
    fused fast path taken out: the plain blocks compute the same numbers)."""
    from vaqkd.quant import remove_fusions

    model = copy.deepcopy(model).eval()
    remove_fusions(model)
    for m in model.modules():  # the caller's hooks must not see the tracer's proxies
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # a forward with data-dependent control flow or an untraceable call
        raise ExportError(f"{type(model).__name__}: cannot be traced for export ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None  # fmt: skip
    gm = fx.GraphModule(model, graph)
    gm.graph.eliminate_dead_code()
    return gm, tracer.outputs


def build_onnx(model: nn.Module, batch: int | None = None, normalise: tuple | None = None, integer: bool = True,
               stop_after: str | None = None):  # fmt: skip
    """The ONNX model (onnx.ModelProto) of a model in eval mode, quantized or not, built from its traced graph.

    `normalise` = (mean·255, std·255) per channel, as the loader holds them: the graph then takes uint8 images
    (N, C, H, W) and computes (x − mean·255)/(std·255) in float32 inside, exactly the loader's arithmetic (one
    preprocessing for every consumer); without it the input is the normalised float image. Output: logits named
    "logits" (with `stop_after`, the output of the module at that path, e.g. "layer3", for checking a graph
    stage by stage). `integer=False`: the reference graph, every conv float on the exact codes (no int32
    biases); it shows how close ONNX Runtime's float arithmetic comes to PyTorch's."""
    import onnx

    gm, outputs = _trace(model)
    b = _Builder(gm, integer)
    g = b.g
    first = next(m for m in gm.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    c_in = first.in_channels if isinstance(first, nn.Conv2d) else first.in_features
    elem = onnx.TensorProto.UINT8 if normalise is not None else onnx.TensorProto.FLOAT
    shape = [batch or "N", c_in, "H", "W"] if isinstance(first, nn.Conv2d) else [batch or "N", c_in]
    stop = outputs.get(stop_after) if stop_after else None
    if stop_after and stop is None:
        raise ExportError(f"stop_after={stop_after!r}: no module of that path in the traced graph")
    result, b.stop = None, stop
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            x = "input"
            if normalise is not None:
                mean, std = (np.asarray(a, np.float32).reshape(1, -1, 1, 1) for a in normalise)
                x = g.op("Div", [g.op("Sub", [g.op("Cast", [x], "pixels", to=onnx.TensorProto.FLOAT),
                                              g.const("mean255", mean)]), g.const("std255", std)], "normalised")
            b.env[n] = _Value(x)
        elif n.op == "get_attr":
            raise ExportError(f"{n.target}: a tensor read directly in forward does not export (use a layer)")
        elif n.op == "output":
            result = n.args[0]
        else:
            b.env[n] = b.node(n)
        if stop is not None and n is stop:
            result = n
            break
    if not isinstance(result, fx.Node):
        raise ExportError(f"{type(model).__name__}: forward must return one tensor (the logits)")
    g.nodes.append(onnx.helper.make_node("Identity", [b.float(b.env[result])], ["logits"], name="logits_out"))
    inp = onnx.helper.make_tensor_value_info("input", elem, shape)
    out = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [batch or "N", *(["C", "h", "w"] if stop
                                             else ["K"])])  # fmt: skip
    graph = onnx.helper.make_graph(g.nodes, "vaqkd", [inp], [out], g.inits)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)], producer_name="vaqkd")
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto)
    return proto

INPUT_DOC = ("uint8 images (N, C, H, W), 0..255; normalised inside the graph as the loader does: (x - mean255) / "
             "std255 in float32, with mean255 = float32(mean) * 255 and std255 = float32(std) * 255 per channel")


def normalisation(mean, std) -> tuple[np.ndarray, np.ndarray]:
    """(mean·255, std·255) per channel in float32 from the statistics in [0, 1] (a dataset's, an artifact header's):
    the one preprocessing of every consumer, computed as the loader computes it (`data.loader.DeviceLoader`)."""
    return tuple((torch.as_tensor(v, dtype=torch.float32).cpu().flatten() * 255).numpy() for v in (mean, std))


def export_onnx(model: nn.Module, out: str | Path, normalise: tuple | None = None,
                metadata: dict[str, str] | None = None) -> Path:  # fmt: skip
    """Write `build_onnx(model, normalise=...)` to `out` atomically, with `metadata` as its metadata_props."""
    import onnx

    from vaqkd.rundir import atomic_write

    proto = build_onnx(model.eval(), normalise=normalise)
    onnx.helper.set_model_props(proto, {k: str(v) for k, v in (metadata or {}).items()})
    return atomic_write(out, lambda tmp: onnx.save(proto, str(tmp)), example="model.onnx")


def source_model(source: str, data_root: str | None = None, arch: str = "resnet32",
                 dataset: str = "cifar100") -> tuple[nn.Module, tuple, dict[str, str]]:  # fmt: skip
    """(model in eval mode on the CPU, (mean, std) in [0, 1], metadata) of what `vaqkd export` reads: a finished
    run directory, a packed artifact, or a weights spec of an FP32 model (`pretrained`, `pretrained:NAME`, a
    .safetensors file of weights: `arch` and `dataset` say what it is)."""
    from vaqkd.deploy.artifact import finished_run, load
    from vaqkd.deploy.integrity import HEADER_KEY

    path = Path(source)
    if path.is_dir():
        cfg, model, data, final = finished_run(path, data_root)
        stats = (data.test.mean.flatten() / 255, data.test.std.flatten() / 255)
        meta = {"dataset": cfg.data.dataset, "image_size": cfg.data.image_size, "source_run": str(path),
                "git_sha": final.get("git_sha", "")}
        return model.eval(), stats, meta
    if path.is_file() and path.suffix == ".safetensors":
        from vaqkd.rundir import read_safetensors

        _, file_meta = read_safetensors(path)
        if HEADER_KEY in (file_meta or {}):  # a packed artifact
            model, header = load(path)
            meta = {"dataset": header["dataset"], "image_size": header["image_size"], "source_artifact": path.name,
                    "git_sha": header.get("git_sha") or ""}
            return model, (header["mean"], header["std"]), meta
    from vaqkd.data.cifar import SPECS
    from vaqkd.models import create_model
    from vaqkd.rundir import load_weights

    if dataset not in SPECS:
        raise ExportError(f"--dataset {dataset}: an FP32 weights file exports for {sorted(SPECS)} (its statistics)")
    model = create_model(arch, SPECS[dataset].num_classes)
    try:
        load_weights(model, source, arch)
    except FileNotFoundError as e:
        raise ExportError(f"{source}: not a run directory, a packed artifact or weights ({e})") from None
    return model.eval(), (SPECS[dataset].mean, SPECS[dataset].std), {"dataset": dataset, "source_weights": source}


def export_source_onnx(source: str, out: str | Path, data_root: str | None = None, arch: str = "resnet32",
                       dataset: str = "cifar100") -> Path:  # fmt: skip
    """The ONNX graph (uint8 input, normalised inside) of a run, a packed artifact or FP32 weights."""
    model, (mean, std), meta = source_model(source, data_root, arch, dataset)
    meta = {**meta, "input": INPUT_DOC, "mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    return export_onnx(model, out, normalisation(mean, std), meta)


def session(path, threads: int = 0, optimize: bool | str = True, save_to: str | Path | None = None):
    """An ONNX Runtime CPU session (a path or serialized model) with all graph optimizations (the QDQ ->
    QLinearConv fusion among them), or with none (`optimize=False`), or up to ORT's extended level
    (`optimize="extended"`: the fusions without the layout transformations); `save_to`: where ORT writes the
    graph as it optimised it."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    level = ort.GraphOptimizationLevel
    opts.graph_optimization_level = {True: level.ORT_ENABLE_ALL, False: level.ORT_DISABLE_ALL,
                                     "extended": level.ORT_ENABLE_EXTENDED}[optimize]  # fmt: skip
    if save_to is not None:
        opts.optimized_model_filepath = str(save_to)
    if threads:
        opts.intra_op_num_threads = threads
    if isinstance(path, bytes):
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    if not Path(path).is_file():
        what = "is a directory, not an ONNX file" if Path(path).is_dir() else "file missing"
        raise RunFileError(f"{path}: {what}")
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # InvalidProtobuf, Fail, InvalidGraph...: a file from outside, damaged or foreign
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RunFileError(f"{path}: damaged or not an ONNX model ({type(e).__name__}: {reason[:160]})") from None


def _feed(sess, x: torch.Tensor) -> dict:
    want = sess.get_inputs()[0].type
    return {"input": x.detach().cpu().numpy() if want == "tensor(uint8)" else x.detach().cpu().float().numpy()}


def ort_logits(sess, x: torch.Tensor) -> torch.Tensor:
    """Logits of a session for x: uint8 images for a graph that normalises inside, else normalised floats."""
    return torch.from_numpy(sess.run(None, _feed(sess, x))[0])
