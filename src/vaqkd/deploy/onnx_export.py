"""Integer inference: any quantized (or FP32) model as an ONNX QDQ graph, built from its traced graph.

    vaqkd export RUN_DIR | ARTIFACT | pretrained --format onnx --out model.onnx

The model is traced with torch.fx down to its layers (`onnx_trace.Tracer`: convs, linears, BatchNorm, quantizers, ReLU,
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
accumulation, one requantization. Its weights are int8 codes behind a per-output-channel scale that carries the LSQ
step and the folded BatchNorm (γ/σ; a channel with γ < 0 has its codes negated, so every scale is positive), with
the BatchNorm shift as the int32 bias at scale s_in·s_w. At 2 bits the rounding of that shift is what decides
agreement (every output of a channel moves by the same error, codes near a boundary flip, the flips cascade:
`benchmarks/onnx_bias_grid.py` measured 88.1 % agreement on one coarse grid), so the grid is made fine: the input
codes are spread over 8 bits (code·k at step/k, k = 43 for 2 bits) and the weight codes scaled by an m in 1..63
chosen per channel to hold the shift most closely (`onnx_grid.bias_multipliers`), with k·m small enough that no
u8·s8 pair overflows int16 (x86 without VNNI sums pairs with vpmaddubsw, which saturates; a signed input's uint8
operand is 128 + code·k, so the signed stem of `first_last = "same"` gets k = 1). A layer no integer kernel computes
exactly (8-bit inputs times 8-bit weights: a W8A8 stem or classifier), or whose BatchNorm shift no int32 holds (γ ≈
0), stays float on a sealed input (Cast, Sub, Mul in place of DequantizeLinear), which ORT's optimiser cannot make
integer behind our back. Two adds of codes followed by a quantizer (DQ, DQ -> Add -> Q) are fused by ORT into
QLinearAdd.

The residual stream decides how much is integer. A float-residual student (`quant.residual = "float"`, the
paper's) adds the unquantized shortcut to its second conv's output, so that conv, the add and the ReLU stay float
(float convs on the exact 2-bit values, dequantized weights as constants ORT can prepack); an integer-residual
student (`"int"`, `vaqkd.quant.residual`) computes codes everywhere, and its optimised graph has no float conv
but the FP32 stem (and a float FC, by policy), no float add but the last block's. Its stem, whose output the
first stream codes quantize, is computed within half an ulp of exact (`deploy.stem`: pixel tables by Gather, an
exact float32 conv of their high parts and the rest), since a float32 conv summing in its own order moves codes and
every later code inherits the move; the integer body after it is exact but for ties. ORT requantizes with a float
multiplier and rounds half to even, so a value on a rounding boundary can land on the other code than in PyTorch:
agreement is measured (benchmarks/deploy_onnx.py, benchmarks/infer.py), not assumed. Wider students export, but
the bias grid is coarser there (at 4 bits ~135x finer only): measure their agreement before relying on it.

The parts: `onnx_trace` (tracing), `onnx_grid` (the integer grid), `onnx_build` (the node-by-node mapping); this
module builds, writes and runs the graph (`build_onnx`, `export_onnx`, `export_source_onnx`, `session`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from vaqkd.deploy.artifact import ExportError
from vaqkd.deploy.onnx_build import Builder, Value
from vaqkd.deploy.onnx_trace import trace
from vaqkd.errors import RunFileError

OPSET = 21
IR_VERSION = 10  # what opset 21 needs; later IR versions are refused by ORT <= 1.24 and OpenVINO's provider


def build_onnx(model: nn.Module, batch: int | None = None, normalise: tuple | None = None, integer: bool = True,
               stop_after: str | None = None, exact_stem: bool = True):  # fmt: skip
    """The ONNX model (onnx.ModelProto) of a model in eval mode, quantized or not, built from its traced graph.

    `normalise` = (mean·255, std·255) per channel, as the loader holds them: the graph then takes uint8 images
    (N, C, H, W) and computes (x − mean·255)/(std·255) in float32 inside, exactly the loader's arithmetic (one
    preprocessing for every consumer); without it the input is the normalised float image. Output: logits named
    "logits" (with `stop_after`, the output of the module at that path, e.g. "layer3", for checking a graph
    stage by stage). `integer=False`: the reference graph, every conv float on the exact codes (no int32
    biases); it shows how close ONNX Runtime's float arithmetic comes to PyTorch's. `exact_stem=False`: an
    integer-residual stem as one plain float32 conv (for measuring what the exact one, `deploy.stem`, changes)."""
    import onnx

    gm, outputs = trace(model)
    b = Builder(gm, integer, exact_stem)
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
            b.env[n] = Value("input") if normalise is None else Value(pixels=("input", normalise))
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
