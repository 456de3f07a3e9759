"""The integer body of an ONNX Runtime graph in channels-last, so that a residual stream of codes needs no transposes.

ORT runs its integer conv (QLinearConv) in NHWC and wraps each one in NCHW<->NHWC transposes, then pushes them
through the graph greedily; on a residual stream of codes (the block's output feeding both the next block's convs,
through their requantization, and its QLinearAdd) the pushes stop at every add: two transposes a block stay (30 in
a ResNet-32; 7 % of the 8-bit-stream student's kernel time in ORT's profiler on AMD Zen 5, batch 256, one
thread: results/deploy/ort_profile_amd_zen5.json). `channels_last` takes the graph as ORT optimised it at the
extended level (QDQ fused into QLinearConv / QLinearAdd, no layout work yet) and decides each tensor's layout in
one forward pass:

- a QLinearConv reads and writes NHWC (`com.microsoft.QLinearConv`, `channels_last=1`: the same integer kernel);
- element-wise ops on per-tensor constants (DequantizeLinear / QuantizeLinear with one scale, Clip, Relu, Cast,
  Add, Sub, Mul, Div, QLinearAdd, QLinearMul) keep their input's layout; an op whose inputs come in both layouts
  reads all in NHWC;
- a Slice or Pad on NHWC has its axes or pads moved to NHWC;
- any other op reads NCHW; a conv, pool or BatchNormalization writes NCHW, every other op a tensor of unknown
  layout ("plain"), which no QLinearConv may read;
- where a reader needs a layout its input does not have, one Transpose is inserted on that tensor (shared by all
  its readers): a ResNet-32 gets two, on uint8 codes after the stem, and one before the pool.

What the pass does not reason about it declines (None): a node with a subgraph (If, Loop, Scan), a QLinearConv
on a tensor of unknown layout or with a weight that is not a 4-D constant, an NHWC graph output; so does a graph
without a QLinearConv (an FP32 teacher: nothing to gain). Only layouts change: every kernel computes what it
computed on the same values, and integer kernels are exact, so the logits should be bit for bit those of the
graph it came from.

Before the layouts, `requantize_pairs` turns each requantization written as DequantizeLinear -> QuantizeLinear on
per-tensor constants (codes at one step re-expressed at another: the input spread before each integer conv, an
8-bit stream read as 2-bit codes) into one `com.microsoft.QLinearMul` by a constant 1: uint8 in, uint8 out, no float
tensor in between (in ORT's profiler the DQ -> Q pairs were a quarter of the 8-bit-stream student's time). The two
round differently in general (round(x·s_a/s_c) + z_c against round(x·(s_a/s_c) + z_c), the zero point added in
float), so a pair is rewritten only where a model of both kernels gives the same code for every one of its 256
input codes (`_same_codes`; with zero points 0 and a small integer ratio, as the spread's, they agree).

`compile_graph` loads the rewrite with every ORT optimization on (the float stem then runs in
ORT's blocked kernel, as in ORT's own graph), checks each instance's first batch against ORT's own graph bit for
bit (a guard against a faulty rewrite, not a proof) and runs ORT's own graph, saying so, where they differ."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

TO_NHWC, TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]
UNARY = {"DequantizeLinear", "QuantizeLinear", "Clip", "Relu", "Cast", "Identity"}
BINARY = {"Add", "Sub", "Mul", "Div", "QLinearAdd", "QLinearMul"}
NCHW_OUT = {"Conv", "FusedConv", "ConvInteger", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
            "BatchNormalization"}  # fmt: skip
DOMAINS = ("", "ai.onnx", "com.microsoft")


def channels_last(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """The graph with its QLinearConvs in NHWC and the layout decided per tensor (see the module docstring), or
    None where there is nothing to gain or something the pass does not reason about."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    if not any(n.op_type == "QLinearConv" for n in g.node) or any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute
    ):
        return None
    consts = {i.name: i for i in g.initializer}
    layout: dict[str, str] = {}
    for i in g.input:
        if i.name not in consts:
            known = i.type.tensor_type.HasField("shape")
            layout[i.name] = "NCHW" if known and len(i.type.tensor_type.shape.dim) == 4 else "plain"
    out, cache, fresh = [], {}, [0]

    def const(array, base: str) -> str:
        fresh[0] += 1
        n = f"{base}_cl{fresh[0]}"
        g.initializer.append(numpy_helper.from_array(array, n))
        return n

    def need(x: str, want: str) -> str:
        """x in layout `want` (x is NCHW or NHWC): x itself, or the (shared) Transpose of it."""
        if layout[x] == want:
            return x
        if (x, want) not in cache:
            fresh[0] += 1
            t = f"{x}_cl{fresh[0]}"
            out.append(helper.make_node("Transpose", [x], [t], name=t, perm=TO_NHWC if want == "NHWC" else TO_NCHW))
            layout[t] = want
            cache[x, want] = t
        return cache[x, want]

    def scalar(x: str) -> bool:
        return x == "" or (x in consts and numpy_helper.to_array(consts[x]).size == 1)

    for node in g.node:
        kind = node.op_type if node.domain in DOMAINS else f"{node.domain}.{node.op_type}"
        acts = [i for i, x in enumerate(node.input) if x in layout]
        ins = {layout[node.input[i]] for i in acts}
        if kind == "QLinearConv":
            w = consts.get(node.input[3])
            if acts != [0] or ins == {"plain"} or w is None or len(w.dims) != 4:
                return None
            want, result = "NHWC", "NHWC"
        elif (kind in UNARY and acts == [0] and all(map(scalar, node.input[1:]))) or (
            kind in BINARY and all(x in layout or scalar(x) for x in node.input)
        ):
            want = "NCHW" if "plain" in ins else ("NHWC" if "NHWC" in ins else "NCHW")
            result = "plain" if "plain" in ins else want
        elif kind in ("Slice", "Pad") and acts == [0] and ins == {"NHWC"} and _movable(node, consts):
            want, result = "NHWC", "NHWC"
        elif kind in ("Slice", "Pad"):  # on NCHW (or what cannot move): same rank, same layout
            want, result = "NCHW", "NCHW" if acts == [0] and ins != {"plain"} else "plain"
        else:
            want, result = "NCHW", "NCHW" if kind in NCHW_OUT else "plain"
        for i in acts:
            if layout[node.input[i]] != "plain":
                node.input[i] = need(node.input[i], want)
        if kind == "QLinearConv":
            kept = [a for a in node.attribute if a.name != "channels_last"]
            del node.attribute[:]
            node.attribute.extend([*kept, helper.make_attribute("channels_last", 1)])
            node.domain = "com.microsoft"
        elif kind in ("Slice", "Pad") and want == "NHWC":
            _move_axes(node, consts, const)
        for o in node.output:
            layout[o] = result
        out.append(node)
    if any(layout.get(o.name) == "NHWC" for o in g.output):
        return None
    del g.node[:]
    g.node.extend(out)
    used = {x for n in out for x in n.input} | {o.name for o in g.output}
    kept = [i for i in g.initializer if i.name in used]  # a moved Slice's axes or Pad's pads: the old ones go
    del g.initializer[:]
    g.initializer.extend(kept)
    del g.value_info[:]  # shapes inferred for NCHW no longer hold
    if not any(op.domain == "com.microsoft" for op in m.opset_import):
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return m


def channels_last_graph(graph) -> bytes | None:
    """ORT's extended-level graph of `graph` (a path or serialized model) through `requantize_pairs` and
    `channels_last`, serialized: what the backend loads; None where the layout pass does not apply. A damaged or
    foreign graph raises its RunFileError (`onnx_export.session`)."""
    import tempfile
    from pathlib import Path

    from vaqkd.deploy.onnx_export import session

    with tempfile.TemporaryDirectory(prefix="vaqkd-ort-") as tmp:
        session(graph, 1, optimize="extended", save_to=Path(tmp) / "extended.onnx")
        rewritten = channels_last(requantize_pairs(onnx.load(str(Path(tmp) / "extended.onnx"))))
    return None if rewritten is None else rewritten.SerializeToString()


def requantize_pairs(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with each DequantizeLinear -> QuantizeLinear pair on per-tensor float32 scales and zero points of
    one 8-bit type that `_same_codes` holds for written as QLinearMul(codes, 1) (see the module docstring); a
    DequantizeLinear whose only reader was the pair goes."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    made = {o: n for n in g.node for o in n.output}
    readers: dict[str, int] = {}
    for n in g.node:
        for x in n.input:
            readers[x] = readers.get(x, 0) + 1
    for o in g.output:
        readers[o.name] = readers.get(o.name, 0) + 1
    taken = set(consts) | set(made) | {n.name for n in g.node} | {i.name for i in g.input}

    def fresh(base: str) -> str:
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        return name

    def scalars(node):
        """(scale, zero point) of a Q or DQ node as Python numbers and the zero point's dtype, or None."""
        vals = [consts.get(x) for x in node.input[1:3]]
        if len(vals) != 2 or any(v is None or v.size != 1 for v in vals) or vals[0].dtype != np.float32:
            return None
        return float(vals[0].reshape(())), int(vals[1].reshape(())), vals[1].dtype

    def scalar0(x: str) -> str:
        """x, or a 0-d copy of it (QLinearMul takes scalar scales and zero points; a [1]-shaped one is refused)."""
        if consts[x].ndim == 0:
            return x
        name = fresh(f"{x}_scalar")
        g.initializer.append(numpy_helper.from_array(consts[x].reshape(()), name))
        consts[name] = consts[x].reshape(())
        return name

    out, ones, gone = [], {}, set()
    for node in g.node:
        dq = made.get(node.input[0]) if node.op_type == "QuantizeLinear" and node.domain in DOMAINS else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in DOMAINS:
            out.append(node)
            continue
        a, c = scalars(dq), scalars(node)
        if a is None or c is None or a[2] != c[2] or a[2] not in (np.uint8, np.int8) or not (
            _same_codes(a[0], a[1], c[0], c[1], a[2])
        ):
            out.append(node)
            continue
        t = a[2]
        if t not in ones:
            ones[t] = [fresh(f"one_{t.name}"), fresh("one_scale"), fresh(f"zero_{t.name}")]
            for name, v in zip(ones[t], (np.array(1, t), np.array(1.0, np.float32), np.array(0, t))):
                g.initializer.append(numpy_helper.from_array(v, name))
        sa, za, sc, zc = (scalar0(x) for x in (dq.input[1], dq.input[2], node.input[1], node.input[2]))
        out.append(helper.make_node("QLinearMul", [dq.input[0], sa, za, *ones[t], sc, zc], list(node.output),
                                    name=fresh(f"{node.name or 'q'}_qlmul"), domain="com.microsoft"))  # fmt: skip
        readers[dq.output[0]] -= 1
        if readers[dq.output[0]] == 0:
            gone.add(id(dq))
    if not ones:
        return m
    del g.node[:]
    g.node.extend(n for n in out if id(n) not in gone)
    if not any(op.domain == "com.microsoft" for op in m.opset_import):
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return m


def _same_codes(s_a: float, z_a: int, s_c: float, z_c: int, dtype) -> bool:
    """Whether DequantizeLinear(s_a, z_a) -> QuantizeLinear(s_c, z_c) and QLinearMul by 1 give the same code for
    every input code x, on a model of ORT's x86 kernels in float32: the pair rounds (x − z_a)·s_a / s_c half to even
    and adds z_c as an integer; QLinearMul multiplies by the ratio s_a·1/s_c, adds z_c in float, converts (a value
    past ±2^31 becomes INT_MIN, as cvtps2dq does) and packs with saturation. Checked against ORT in the tests."""
    info = np.iinfo(dtype)
    x = (np.arange(info.min, info.max + 1, dtype=np.int64) - z_a).astype(np.float32)
    s_a, s_c = np.float32(s_a), np.float32(s_c)
    if not (np.isfinite(s_a) and np.isfinite(s_c) and s_a > 0 and s_c > 0):
        return False
    with np.errstate(over="ignore", invalid="ignore"):
        pair = np.clip(np.rint((x * s_a) / s_c), info.min - z_c, info.max - z_c) + z_c
        w = x * ((s_a * np.float32(1.0)) / s_c) + np.float32(z_c)
        mul = np.where(np.abs(w) < 2.0**31, np.rint(w), -(2.0**31))
    mul = np.clip(np.clip(mul, -(2**15), 2**15 - 1), info.min, info.max)
    return bool(np.array_equal(pair, mul))


def _movable(node, consts) -> bool:
    if node.op_type == "Slice":  # starts, ends, axes given as constants (steps optional)
        return len(node.input) >= 4 and node.input[3] in consts
    return (len(node.input) in (2, 3) and node.input[1] in consts  # Pad of all four axes, without an axes input
            and numpy_helper.to_array(consts[node.input[1]]).size == 8)  # fmt: skip


def _move_axes(node, consts, const) -> None:
    """A Slice's axes or a Pad's pads from NCHW to NHWC (axis 1 -> 3, 2 -> 1, 3 -> 2)."""
    if node.op_type == "Slice":
        axes = numpy_helper.to_array(consts[node.input[3]])
        moved = [{0: 0, 1: 3, 2: 1, 3: 2}[int(a) % 4] for a in axes]
        node.input[3] = const(np.asarray(moved, np.int64), "axes")
    else:
        pads = numpy_helper.to_array(consts[node.input[1]]).reshape(2, 4)
        node.input[1] = const(pads[:, TO_NHWC].reshape(-1).copy(), "pads")
