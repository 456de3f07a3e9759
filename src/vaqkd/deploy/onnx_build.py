"""The node-by-node mapping of a traced model to ONNX (`Builder`): each fx node to its ops, quantized convs to the
DQ -> Conv -> Q pattern ORT fuses into QLinearConv, on the integer grid of `deploy.onnx_grid`. The whole export
and its arithmetic: `deploy.onnx_export`."""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from vaqkd.deploy.artifact import ExportError, weight_codes
from vaqkd.deploy.onnx_grid import (
    INT16_PAIR,
    act_step,
    bias_multipliers,
    bn_fold,
    conv_bn_fold,
    exact_in_int16,
    input_spread,
)
from vaqkd.deploy.onnx_trace import consumer_quants, is_relu
from vaqkd.deploy.stem import exact_parts


class Graph:
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


class Value:
    """What a traced tensor is in the graph: a float tensor, integer codes (uint8 at zero point `zp`) of the
    quantizer `q` with step `step`, dequantized on demand (`Builder.float`), or the graph's uint8 pixels with their
    normalisation (`pixels`), normalised on demand (or read through the exact stem's table, `pixels_conv`)."""

    def __init__(self, name: str | None = None, codes: str | None = None, q=None, step: float = 0.0, zp: int = 0,
                 pixels: tuple | None = None):  # fmt: skip
        self.name, self.codes, self.q, self.step, self.zp = name, codes, q, step, zp
        self.pixels = pixels  # the graph's uint8 input and its normalisation (mean255, std255): normalised on demand


class Builder:
    def __init__(self, gm: fx.GraphModule, integer: bool, exact_stem: bool = True):
        self.g, self.gm, self.integer = Graph(), gm, integer
        self.exact_stem = exact_stem  # an integer-residual stem on the pixels computed exactly (`pixels_conv`)
        self.stop: fx.Node | None = None  # build_onnx(stop_after=...): the node whose output the graph gives
        self.modules = dict(gm.named_modules())
        self.env: dict[fx.Node, Value] = {}
        self.folded: set[fx.Node] = set()  # BatchNorm nodes folded into the conv before them

    # --- values ---------------------------------------------------------------------------------------------
    def float(self, v: Value) -> str:
        if v.name is None and v.pixels is not None:  # (x − mean255)/std255 in float32, the loader's arithmetic
            from onnx import TensorProto

            g, (x, (mean, std)) = self.g, v.pixels
            mean, std = (np.asarray(a, np.float32).reshape(1, -1, 1, 1) for a in (mean, std))
            x = g.op("Sub", [g.op("Cast", [x], "pixels", to=TensorProto.FLOAT), g.const("mean255", mean)])
            v.name = g.op("Div", [x, g.const("std255", std)], "normalised")
        elif v.name is None:
            g = self.g
            v.name = g.op("DequantizeLinear", [v.codes, g.const("a_scale", np.array(v.step, np.float32)),
                                               g.const("a_zp", np.array(v.zp, np.uint8))], "a_hat")  # fmt: skip
        return v.name

    def float_sealed(self, v: Value) -> str:
        """v's values as floats computed as DequantizeLinear does, (code − zp)·step, but by Cast, Sub and Mul: no
        runtime's QDQ pass sees a DQ there to fuse the layer after it into an integer kernel (for the layers whose
        8-bit products an integer kernel would not keep exactly: `exact_in_int16`)."""
        if v.codes is None:
            return self.float(v)
        from onnx import TensorProto

        g = self.g
        x = g.op("Cast", [v.codes], "a_float", to=TensorProto.FLOAT)
        x = g.op("Sub", [x, g.const("a_zp_f", np.array(v.zp, np.float32))], "a_centred")
        return g.op("Mul", [x, g.const("a_scale", np.array(v.step, np.float32))], "a_hat")

    def quant(self, v: Value, q) -> Value:
        """Q -> Clip(Qn, Qp) of the quantizer q: its codes and clamp (a signed quantizer's codes as uint8 at zero
        point 128). Codes of q already are q's codes. QuantizeLinear computes x / s where PyTorch computes
        x · (1/s): a value within an ulp of a rounding boundary can land on the neighbouring code (ties themselves
        round half to even in both)."""
        if v.q is q:
            return v
        s, zp = act_step(q), (128 if q.signed else 0)
        g = self.g
        codes = g.op("QuantizeLinear", [self.float(v), g.const("a_scale", np.array(s, np.float32)),
                                        g.const("a_zp", np.array(zp, np.uint8))], "a_codes")  # fmt: skip
        if (zp + q.qn, zp + q.qp) != (0, 255):  # an 8-bit quantizer's clamp is QuantizeLinear's saturation
            codes = g.op("Clip", [codes, g.const("qn", np.array(zp + q.qn, np.uint8)),
                                  g.const("qp", np.array(zp + q.qp, np.uint8))])  # fmt: skip
        return Value(codes=codes, q=q, step=s, zp=zp)

    def add_operand(self, v: Value) -> str:
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
    def conv(self, node: fx.Node, conv: nn.Conv2d, v: Value) -> Value:
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
        scale, shift = conv_bn_fold(conv, bn)
        attrs = dict(kernel_shape=list(conv.kernel_size), strides=list(conv.stride), dilations=list(conv.dilation),
                     pads=[conv.padding[0], conv.padding[1]] * 2, group=conv.groups)  # fmt: skip
        readers = consumer_quants(out_node, self.modules)
        if not isinstance(conv, QConv2d):
            w = conv.weight.detach().double().numpy() * scale[:, None, None, None]
            if v.pixels is not None and self.exact_stem and self.integer and readers and None not in readers:
                y = self.pixels_conv(v.pixels, w, shift, attrs)
                if y is not None:
                    return Value(y)
            x = self.float(v)
            w = g.const("w", w.astype(np.float32))
            return Value(g.op("Conv", [x, w, g.const("bias", shift.astype(np.float32))], "conv", **attrs))
        v = self.quant(v, conv.a_quant)
        codes, qn = weight_codes(conv)
        q = (codes + qn).numpy().astype(np.int64)  # (C_out, C_in, k, k), in [Qn, Qp]
        span = max(-qn, conv.w_quant.qp)
        exact = exact_in_int16(conv)
        fused = (self.integer and exact and len(readers) > 0
                 and all(r is readers[0] and r is not None for r in readers))  # fmt: skip
        # input codes spread over 8 bits (code·k at step/k): a k times finer int32 bias grid
        k = input_spread(conv.a_quant, span) if fused else 1
        s_in = float(np.float32(v.step) / np.float32(k)) if k > 1 else v.step
        s_w = conv.w_quant.step.detach().double().reshape(-1).numpy() * np.ones(c_out)
        ch_scale = s_w * scale
        # codes x m at scale/m: the same weights, and the int32 bias m times finer; per channel the m in 1..m_max
        # whose grid holds the BN shift best (`bias_multipliers`), with every u8·s8 pair within `INT16_PAIR`.
        # Codes are negated where γ < 0 (every scale positive); 8-bit codes cannot be negated in int8: they keep a
        # negative scale.
        a = conv.a_quant
        u8_top = (128 if a.signed else 0) + k * (max(-a.qn, a.qp) if a.signed else a.qp)  # the uint8 operand's top
        m_max = max(min(127 // span, INT16_PAIR // (u8_top * span)), 1) if fused else max(127 // span, 1)
        sign = np.where(ch_scale < 0, -1, 1) if span * m_max <= 127 else np.ones(c_out, np.int64)
        m = bias_multipliers(shift, s_in * np.abs(ch_scale), m_max) if fused else np.full(c_out, m_max, np.int64)
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
        return Value(g.op("Conv", [x, w, bias], "conv", **attrs))

    def pixels_conv(self, pixels: tuple, w: np.ndarray, shift: np.ndarray, attrs: dict) -> str | None:
        """A float conv on the normalised pixels whose output only quantizers read (an integer-residual stem),
        computed within about half an ulp of exact (`deploy.stem`): the table by Gather, two convs and one Sub.
        None where the weights do not split (the plain conv then)."""
        from onnx import TensorProto

        parts = exact_parts(w, shift, pixels[1]) if attrs["group"] == 1 else None
        if parts is None:
            return None
        g, c = self.g, len(parts["n"])
        offsets = g.const("channel_row", (np.arange(c, dtype=np.int32) * 256).reshape(1, -1, 1, 1))
        index = g.op("Add", [g.op("Cast", [pixels[0]], "pixel_index", to=TensorProto.INT32), offsets])
        n = g.op("Gather", [g.const("pixel_table", parts["n"].reshape(-1)), index], "pixels")
        a = g.op("Round", [g.op("Mul", [n, g.const("grid_inv", np.float32(1) / parts["grid"])])])
        hi = g.op("Mul", [a, g.const("grid", parts["grid"])], "pixels_hi")
        lo = g.op("Sub", [n, hi], "pixels_lo")
        exact = g.op("Conv", [hi, g.const("w_hi", parts["w_hi"]), g.const("b_hi", parts["b_hi"])], "conv_exact",
                     **attrs)  # fmt: skip
        w_rest = -np.concatenate([parts["w_lo"], parts["w_hi"]], axis=1)  # on [n, n_lo], negated: y = exact − rest
        rest = g.op("Conv", [g.op("Concat", [n, lo], "pixels_both", axis=1), g.const("w_rest", w_rest),
                             g.const("b_rest", -parts["b_lo"])], "conv_rest_negated", **attrs)  # fmt: skip
        return g.op("Sub", [exact, rest], "conv")

    def linear(self, fc: nn.Linear, v: Value) -> Value:
        from vaqkd.quant import QLinear

        g = self.g
        x = None
        if isinstance(fc, QLinear):
            v = self.quant(v, fc.a_quant)
            codes, qn = weight_codes(fc)
            s_w = fc.w_quant.step.detach().float().reshape(-1).numpy() * np.ones(fc.out_features, np.float32)
            if exact_in_int16(fc):
                zp, scale = g.const("w_zp", np.zeros(fc.out_features, np.int8)), g.const("w_scale", s_w)
                w = g.op("DequantizeLinear", [g.const("w_codes", (codes + qn).numpy().astype(np.int8)), scale, zp],
                         "w_hat", axis=0)  # fmt: skip
            else:  # 8-bit x 8-bit: float weights of the exact codes, on a sealed float input
                w = g.const("w_hat", (codes + qn).numpy().astype(np.float32) * s_w[:, None])
                x = self.float_sealed(v)
        else:
            w = g.const("w", fc.weight.detach().float().numpy())
        b = fc.bias.detach().float().numpy() if fc.bias is not None else np.zeros(fc.out_features, np.float32)
        return Value(g.op("Gemm", [x or self.float(v), w, g.const("b", b)], "gemm", transB=1))

    def batchnorm(self, bn: nn.BatchNorm2d, v: Value) -> Value:
        scale, shift = bn_fold(bn)
        g = self.g
        shape = (1, -1, 1, 1)
        y = g.op("Mul", [self.float(v), g.const("bn_scale", scale.astype(np.float32).reshape(shape))])
        return Value(g.op("Add", [y, g.const("bn_shift", shift.astype(np.float32).reshape(shape))]))

    def slice(self, v: Value, index) -> Value:
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
            return Value(codes=g.op("Slice", [v.codes, *ins]), q=v.q, step=v.step, zp=v.zp)
        return Value(g.op("Slice", [self.float(v), *ins]))

    def pad(self, v: Value, pads, mode: str = "constant", value=None) -> Value:
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
            return Value(codes=out, q=v.q, step=v.step, zp=v.zp)
        return Value(g.op("Pad", [self.float(v), p], mode="constant"))

    # --- the walk -------------------------------------------------------------------------------------------
    def value(self, a) -> Value:
        if not isinstance(a, fx.Node):
            raise ExportError(f"a constant {a!r} where a tensor was expected")
        return self.env[a]

    def node(self, n: fx.Node) -> Value:
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
            if is_relu(n, mods):
                return self.relu(n, self.value(n.args[0]))
            if t in (operator.add, torch.add) or name == "add":
                a, b = (self.value(v) for v in n.args[:2])
                return Value(g.op("Add", [self.add_operand(a), self.add_operand(b)]))
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

    def relu(self, n: fx.Node, v: Value) -> Value:
        """ReLU; left out where every reader is an unsigned quantizer (its clamp at 0 is the ReLU), so the add
        or conv before it meets QuantizeLinear directly and ORT fuses the pair into an integer kernel."""
        qs = consumer_quants(n, self.modules)
        absorbed = qs and all(q is not None and q.clamps_at_zero for q in qs)
        if self.integer and absorbed and v.codes is None and n is not self.stop:  # a stage's output: as it is
            return v
        if v.codes is not None and v.zp == 0:
            return v  # codes of an unsigned quantizer are >= 0 already
        return Value(self.g.op("Relu", [self.float(v)]))

    def pool(self, size, v: Value) -> Value:
        if size not in (1, (1, 1), [1, 1]):
            raise ExportError(f"adaptive average pool to {size}: only a global pool (output size 1) exports")
        return Value(self.g.op("GlobalAveragePool", [self.float(v)]))

    def flatten(self, v: Value, start: int, end: int) -> Value:
        if (start, end) != (1, -1):
            raise ExportError(f"flatten({start}, {end}): only flatten(x, 1) exports")
        return Value(self.g.op("Flatten", [self.float(v)], axis=1))
