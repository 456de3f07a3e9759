"""Integer inference in ONNX Runtime: a CIFAR ResNet (quantized or not) as an ONNX graph built from its weights.

    vaqkd export RUN_DIR --format onnx --out model.onnx

Form, chosen by measurement (results/deploy/): the QDQ form, which ORT's graph optimizer turns into integer
kernels. Each quantized convolution reads its input through QuantizeLinear (uint8, zero point 0) -> Clip(0, 3)
-> DequantizeLinear: the 2-bit activation codes and their clamp, exactly; its weights are int8 codes behind a
per-output-channel scale that carries the LSQ step and the folded BatchNorm (γ/σ; a channel with γ < 0 has
its codes negated, so every scale is positive), with the BatchNorm shift as the bias. Where a convolution's
output goes straight into the next 2-bit quantizer (the first conv of every block), the pattern DQ -> Conv
-> Q is fused by ORT into QLinearConv: uint8 x int8 products, int32 accumulation, one requantization to the
next layer's 2-bit codes.

QLinearConv takes the bias as an int32 at scale s_in·s_w, and at 2 bits the rounding of the BatchNorm shift
to that grid is what decides agreement: every output of a channel moves by the same error, the codes near a
rounding boundary flip, and the flips cascade through the blocks (`benchmarks/onnx_bias_grid.py`, on the
committed W2A2 artifact: one grid for every channel gave 88.1 % of PyTorch's predictions; the same PyTorch
model with its shifts rounded to that grid gave 88.1 %, and ORT agreed with *that* model on 99.8 %). So the
grid is made fine: the input codes are spread over 8 bits (code·k at step/k, k = 43 for 2 bits), the weight
codes are scaled by an m in 1..63 chosen per channel to hold the shift most closely (`_bias_multipliers`), and
k·m stays small enough that no u8·s8 pair overflows int16 (x86 without VNNI sums pairs with vpmaddubsw, which
saturates). Measured on a quick-table student: 99.87 % of
PyTorch's predictions, as close as ORT's float graph (99.87 %) and as PyTorch fp32 is to PyTorch fp64
(99.89 %): the rest is float rounding. The convs that stay float get their dequantized weights as constants
(ORT does not fold DequantizeLinear, and behind it the float conv ran 2x slower than the teacher's).
The grid is what limits other bit widths: at 4 bits it can be made only ~135x finer (k = 9, m <= 15), and a
W4A4 ResNet-32 (the teacher's weights, calibrated, not trained) agrees on 98.65 % of 2,000 test images where
the float reference graph agrees on 99.90 % (same script). W2A2 is what this form is built for; wider students export,
but measure their agreement (benchmarks/deploy_onnx.py) before relying on it.

What does not run in integers, named: (1) the second conv of every block feeds the residual add, which the
trained model computes in floating point (the shortcut carries the unquantized block output); quantizing that
stream would change the model's arithmetic, so these convs are float convs on the exact 2-bit values; (2) the
residual adds, the ReLUs, the global average pool and, under `first_last = "fp32"`, the first conv and the
last FC are float; (3) ORT requantizes with a float multiplier and rounds half to even, so a value on a
rounding boundary can land on the other code than in PyTorch: agreement is measured, not assumed. Speed: the
QLinearConvs take ~2.3x less time than the float convs, but half the convs stay float and the NCHW<->NHWC
transposes and the Q/Clip/DQ element-wise ops around each fused conv cost more than that saves: the graph
runs below the FP32 teacher's speed (results/deploy/onnx.json has the share of each operator).
Torch's ONNX exporters refuse a fake-quantize range of 0..3, hence the graph is built with `onnx.helper`.
Supported: CIFAR ResNets (`models.resnet_cifar`) with LSQ or PACT activations and LSQ weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from vaqkd.deploy.artifact import ExportError, weight_codes
from vaqkd.errors import RunFileError

OPSET = 21


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
        self.inits.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
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


def _quant_input(g: _Graph, x: str, q: nn.Module, spread: int = 1) -> tuple[str, float]:
    """Q -> Clip(Qn, Qp) -> DQ: the quantizer's codes and clamp, exactly. Returns (dequantized, step).
    `spread` > 1: the codes are then re-expressed as code·spread at step/spread (Q -> DQ, exact: the codes are
    integers), so a QLinearConv reading them has an int32 bias grid `spread` times finer."""
    s = _act_step(q)
    zp_type = np.int8 if q.signed else np.uint8
    scale, zp = g.const("a_scale", np.array(s, np.float32)), g.const("a_zp", np.array(0, zp_type))
    codes = g.op("QuantizeLinear", [x, scale, zp], "a_codes")
    codes = g.op("Clip", [codes, g.const("qn", np.array(q.qn, zp_type)), g.const("qp", np.array(q.qp, zp_type))])
    deq = g.op("DequantizeLinear", [codes, scale, zp], "a_hat")
    if spread == 1:
        return deq, s
    s2 = np.float32(s) / np.float32(spread)
    scale2 = g.const("a_scale", np.array(s2, np.float32))
    codes2 = g.op("QuantizeLinear", [deq, scale2, zp], "a_codes")
    return g.op("DequantizeLinear", [codes2, scale2, zp], "a_hat"), float(s2)


def _conv(g: _Graph, x: str, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, requant_to: nn.Module | None,
          x_quantized: float | None = None, int_bias: bool = True) -> str:  # fmt: skip
    """BN(conv(x)) as ONNX; with `requant_to` (the next quantizer) the output goes straight into its Q -> Clip
    -> DQ (the QLinearConv pattern) and the dequantized codes are returned. `x_quantized`: x is already this
    conv's quantized input (its step), made by the previous conv's requantization."""
    from vaqkd.quant import QConv2d

    c_out = conv.out_channels
    scale, shift = _bn_fold(bn) if bn is not None else (np.ones(c_out), np.zeros(c_out))
    attrs = dict(kernel_shape=list(conv.kernel_size), strides=list(conv.stride), pads=[conv.padding[0]] * 2 +
                 [conv.padding[1]] * 2, group=conv.groups)  # fmt: skip
    if isinstance(conv, QConv2d):
        codes, qn = weight_codes(conv)
        q = (codes + qn).numpy().astype(np.int64)  # (C_out, C_in, k, k), in [Qn, Qp]
        span = max(-qn, conv.w_quant.qp)
        fused = requant_to is not None and int_bias  # QLinearConv: int32 bias at s_in·s_w
        spread = _input_spread(conv.a_quant, span) if fused else 1  # input codes over 8 bits: a finer bias grid
        x, s_in = (x, x_quantized) if x_quantized is not None else _quant_input(g, x, conv.a_quant, spread)
        s_w = conv.w_quant.step.detach().double().reshape(-1).numpy() * np.ones(c_out)
        ch_scale = s_w * scale
        # codes x m at scale/m: the same weights, and the int32 bias (quantized at s_in·scale/m) m times finer;
        # per channel the m in 1..m_max whose grid holds the BN shift best (`_bias_multipliers`). Codes are
        # negated where γ < 0 (so every scale is positive); 8-bit codes cannot be negated in int8: they keep a
        # negative scale.
        m_max = max(127 // span, 1)
        flip = span * m_max <= 127
        sign = np.where(ch_scale < 0, -1, 1) if flip else np.ones(c_out, np.int64)
        m = np.full(c_out, m_max, np.int64)
        if fused:
            m = _bias_multipliers(shift, s_in * np.abs(ch_scale), m_max)
        q = q * (sign * m)[:, None, None, None]
        ch_scale = ch_scale * sign / m
        if fused:
            w = g.op("DequantizeLinear", [g.const("w_codes", q.astype(np.int8)),
                                          g.const("w_scale", ch_scale.astype(np.float32)),
                                          g.const("w_zp", np.zeros(c_out, np.int8))], "w_hat", axis=0)  # fmt: skip
        else:  # a float conv: the values DequantizeLinear would give (one fp32 product), as a constant ORT can
            # prepack (ORT does not fold DequantizeLinear; behind it the conv ran 2x slower than the teacher's)
            w = g.const("w_hat", q.astype(np.float32) * ch_scale.astype(np.float32)[:, None, None, None])
        if fused:  # int32 bias at scale s_in·s_w, as QLinearConv requires
            b_scale = (s_in * ch_scale).astype(np.float32)
            b_int = np.round(shift / b_scale.astype(np.float64)).astype(np.int32)
            bias = g.op("DequantizeLinear", [g.const("b_codes", b_int), g.const("b_scale", b_scale),
                                             g.const("b_zp", np.zeros(c_out, np.int32))], "b_hat", axis=0)  # fmt: skip
        else:
            bias = g.const("bias", shift.astype(np.float32))
    else:
        w_f = conv.weight.detach().double().numpy() * scale[:, None, None, None]
        w = g.const("w", w_f.astype(np.float32))
        bias = g.const("bias", shift.astype(np.float32))
    y = g.op("Conv", [x, w, bias], "conv", **attrs)
    if requant_to is not None:
        y, _ = _quant_input(g, y, requant_to)
    return y


INT16_PAIR = 16383  # |a|·|w| bound: u8·s8 pairs summed in int16 (vpmaddubsw, x86 without VNNI) cannot saturate


def _input_spread(q: nn.Module, w_span: int) -> int:
    """How far a fused conv's input codes are spread (code·k at step/k): as far as 8 bits allow while every
    product with the weight codes (scaled by up to 127 // w_span) stays within `INT16_PAIR`."""
    a_max = q.qp if not q.signed else max(-q.qn, q.qp)
    w_max = w_span * max(127 // w_span, 1)
    return max(1, min((255 if not q.signed else 127) // a_max, INT16_PAIR // (a_max * w_max)))


def _bias_multipliers(shift: np.ndarray, unit: np.ndarray, m_max: int) -> np.ndarray:
    """Per output channel, the weight multiplier m in 1..m_max whose int32 bias grid (unit / m) holds the
    BatchNorm shift most closely: the error |shift − round(shift·m/unit)·unit/m| is what QLinearConv adds to
    every output of the channel, and at 2 bits it moves codes that lie near a rounding boundary."""
    ms = np.arange(1, m_max + 1)
    grid = (unit[:, None] / ms[None, :]).astype(np.float32).astype(np.float64)  # as b_scale below
    err = np.abs(shift[:, None] - np.round(shift[:, None] / grid) * grid)
    return ms[np.argmin(err, axis=1)]


def _shortcut(g: _Graph, x: str, block) -> str:
    if not block.downsample:
        return x

    def i64(base, *v):
        return g.const(base, np.array(v, np.int64))

    sub = g.op("Slice", [x, i64("st", 0, 0), i64("en", 2**62, 2**62), i64("ax", 2, 3), i64("sp", 2, 2)])
    p = block.pad
    pads = np.array([0, p // 2, 0, 0, 0, p - p // 2, 0, 0], np.int64)
    return g.op("Pad", [sub, g.const("pads", pads)], mode="constant")


def build_onnx(model: nn.Module, batch: int | None = None, stop_after_blocks: int | None = None,
               integer: bool = True):  # fmt: skip
    """The ONNX model (onnx.ModelProto) of a CIFAR ResNet in eval mode, quantized or not. Input: normalised
    images float (N, 3, H, W) named "input"; output: logits (N, K) named "logits" (or, with
    `stop_after_blocks`, the output of that many residual blocks: for checking the graph stage by stage).
    `integer=False`: the reference graph, with float biases (QLinearConv cannot take them: run it without graph
    optimizations); it shows how close ONNX Runtime's float arithmetic comes to PyTorch's."""
    import onnx

    from vaqkd.models.resnet_cifar import CifarResNet
    from vaqkd.quant import QConv2d, QLinear

    if not isinstance(model, CifarResNet):
        raise ExportError(f"{type(model).__name__}: ONNX export knows the CIFAR ResNets only")
    g = _Graph()
    blocks = [*model.layer1, *model.layer2, *model.layer3]
    h = _conv(g, "input", model.conv1, model.bn1, None)
    h = g.op("Relu", [h])
    for i, block in enumerate(blocks):
        if stop_after_blocks is not None and i == stop_after_blocks:
            break
        quantized = isinstance(block.conv2, QConv2d)
        mid = _conv(g, h, block.conv1, block.bn1, block.conv2.a_quant if quantized else None, int_bias=integer)
        if not quantized:
            mid = g.op("Relu", [mid])
        out = _conv(g, mid, block.conv2, block.bn2, None, _act_step(block.conv2.a_quant) if quantized else None)
        h = g.op("Relu", [g.op("Add", [out, _shortcut(g, h, block)])])
    if stop_after_blocks is not None:
        g.nodes.append(onnx.helper.make_node("Identity", [h], ["logits"], name="logits_out"))
        c = blocks[stop_after_blocks - 1].conv2.out_channels if stop_after_blocks else 16
        out = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [batch or "N", c, "h", "w"])
        inp = onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [batch or "N", 3, "H", "W"])
        graph = onnx.helper.make_graph(g.nodes, "vaqkd", [inp], [out], g.inits)
        return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)])
    emb = g.op("Flatten", [g.op("GlobalAveragePool", [h])])
    fc = model.fc
    if isinstance(fc, QLinear):
        emb, _ = _quant_input(g, emb, fc.a_quant)
        codes, qn = weight_codes(fc)
        s_w = fc.w_quant.step.detach().float().reshape(-1).numpy() * np.ones(fc.out_features, np.float32)
        w = g.op("DequantizeLinear", [g.const("w_codes", (codes + qn).numpy().astype(np.int8)),
                                      g.const("w_scale", s_w.astype(np.float32)),
                                      g.const("w_zp", np.zeros(fc.out_features, np.int8))],
                 "w_hat", axis=0)  # fmt: skip
    else:
        w = g.const("w", fc.weight.detach().float().numpy())
    logits = g.op("Gemm", [emb, w, g.const("b", fc.bias.detach().float().numpy())], "gemm", transB=1)
    g.nodes.append(onnx.helper.make_node("Identity", [logits], ["logits"], name="logits_out"))
    size = model.conv1.in_channels
    inp = onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [batch or "N", size, "H", "W"])
    out = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [batch or "N", fc.out_features])
    graph = onnx.helper.make_graph(g.nodes, "vaqkd", [inp], [out], g.inits)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)], producer_name="vaqkd")
    onnx.checker.check_model(proto)
    return proto


def export_onnx(model: nn.Module, out: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write `build_onnx(model)` to `out` atomically, with `metadata` as the model's metadata_props."""
    import onnx

    from vaqkd.rundir import atomic_write

    proto = build_onnx(model.eval())
    onnx.helper.set_model_props(proto, {k: str(v) for k, v in (metadata or {}).items()})
    return atomic_write(out, lambda tmp: onnx.save(proto, str(tmp)))


def session(path, threads: int = 0, optimize: bool = True):
    """An ONNX Runtime CPU session (a path or serialized model) with all graph optimizations (the QDQ ->
    QLinearConv fusion among them), or with none."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    level = ort.GraphOptimizationLevel
    opts.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    if isinstance(path, bytes):
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    if not Path(path).is_file():
        raise RunFileError(f"{path}: file missing")
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # InvalidProtobuf, Fail, InvalidGraph...: a file from outside, damaged or foreign
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RunFileError(f"{path}: damaged or not an ONNX model ({type(e).__name__}: {reason[:160]})") from None


def export_run_onnx(run_dir: str | Path, out: str | Path, data_root: str | None = None) -> Path:
    """The ONNX graph of a finished run (quantized or FP32), with its dataset and source in the metadata."""
    from vaqkd.deploy.artifact import finished_run

    run = Path(run_dir)
    cfg, model, _, final = finished_run(run, data_root)
    meta = {"dataset": cfg.data.dataset, "source_run": str(run), "git_sha": final.get("git_sha", ""),
            "input": "normalised images (N, 3, H, W), float32"}  # fmt: skip
    return export_onnx(model, out, meta)


def ort_logits(sess, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(sess.run(None, {"input": x.detach().cpu().float().numpy()})[0])


def ort_evaluate(path: str | Path, loader, threads: int = 0) -> dict[str, float]:
    """Top-1 of an ONNX graph in ONNX Runtime over a loader's batches."""
    sess = session(path, threads)
    correct = n = 0
    for x, y, _ in loader.batches(0):
        correct += int((ort_logits(sess, x).argmax(1) == y.cpu()).sum())
        n += len(y)
    return {"top1": 100.0 * correct / n}
