"""Where ONNX Runtime spends a W2A2 graph's time: ORT's own profiler, per op type and per node, for the graph as the
backend runs it (integer body channels-last, `vaqkd.deploy.ort_layout`), as ORT lays it out alone, and (with
`--teacher`) the FP32 teacher's graph beside them, each conv's multiply-adds per second of kernel time included.

    python benchmarks/ort_profile.py --student results/deploy/qkd_logit-int8stream-s0.vaqkd.safetensors \
        --out results/deploy/ort_profile.json

The student (a packed artifact or a finished run) is exported as `vaqkd export` does (uint8 input, normalised
inside); each layout runs `--runs` profiled batches of `--batch` random images on `--threads` threads after one
warm call. Shares are of summed kernel time (ORT's `*_kernel_time` events); with several threads a kernel's time
is its wall time, not CPU time. Nothing else heavy may run meanwhile."""

from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from infer import _cpu_name, _git_sha  # noqa: E402

from vaqkd.cli import int_in, output_file, write_output  # noqa: E402
from vaqkd.data.build import env_data_root  # noqa: E402
from vaqkd.deploy.artifact import ExportError  # noqa: E402
from vaqkd.deploy.onnx_export import build_onnx, normalisation, source_model  # noqa: E402


def profile(graph: bytes, layout: str, threads: int, batch: int, runs: int, tmp: Path) -> dict:
    """Per op type and per node: ms per batch and share of kernel time, and the graph's op counts; the convs'
    multiply-adds (per image) and their rate in G MAC/s of kernel time."""
    import onnx
    import onnxruntime as ort

    from vaqkd.deploy.ort_layout import channels_last_graph

    graph_in = graph
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp / layout)
    opts.log_severity_level = 3
    if layout == "channels-last":
        graph = channels_last_graph(graph)  # loaded as the backend loads it: every ORT optimization on
        if graph is None:
            raise ExportError("--student: the graph has no integer conv; nothing to lay out channels-last")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp / f"{layout}.onnx")
    sess = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp / f"{layout}.onnx")).graph.node)
    x = np.random.default_rng(0).integers(0, 256, (batch, 3, 32, 32), dtype=np.uint8)
    sess.run(None, {"input": x})
    for _ in range(runs):
        sess.run(None, {"input": x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    by_op, by_node = collections.Counter(), collections.Counter()
    kernel = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    warm = collections.Counter()
    for e in kernel:  # the first (warm) call of each node is left out
        warm[e["name"]] += 1
        if warm[e["name"]] == 1:
            continue
        by_op[e["args"]["op_name"]] += e["dur"]
        by_node[e["name"].removesuffix("_kernel_time")] += e["dur"]
    total = sum(by_op.values())
    macs = conv_macs(graph_in)
    # integer convs run as QLinearConv / ConvInteger, float ones as Conv, FusedConv, NhwcFusedConv, ...
    int_us = sum(v for op, v in by_op.items() if _is_conv(op) and ("QLinear" in op or "Integer" in op)) / runs
    float_us = sum(v for op, v in by_op.items() if _is_conv(op)) / runs - int_us
    rate = {kind: macs[kind] * batch / us / 1e3 if macs[kind] and us > 0 else None  # G MAC/s of kernel time
            for kind, us in (("integer", int_us), ("float", float_us))}  # fmt: skip
    return {"ms_per_batch": total / runs / 1000, "op_counts": dict(ops),
            "conv_macs_per_image": macs, "conv_ms_per_batch": {"integer": int_us / 1e3, "float": float_us / 1e3},
            "conv_gmac_per_s": rate,
            "by_op": {k: {"ms": v / runs / 1000, "share": v / total} for k, v in by_op.most_common()},
            "top_nodes": {k: v / runs / 1000 for k, v in by_node.most_common(15)}}  # fmt: skip


def _is_conv(op: str) -> bool:
    return (op.endswith("Conv") or op.endswith("ConvInteger")) and "Transpose" not in op


def conv_macs(graph: bytes, image: tuple = (1, 3, 32, 32)) -> dict[str, int]:
    """Multiply-adds per image that the convs of an exported (not yet optimised) ONNX graph execute, from shape
    inference on one image of the given shape: {"integer": the quantized convs' (QDQ: weights from a
    DequantizeLinear, or QLinearConv / ConvInteger), "float": the others'}. An integer-residual student's exact
    stem executes its two convs, three times the stem's multiply-adds (`vaqkd.deploy.stem`)."""
    import onnx

    model = onnx.load_from_string(graph)
    for d, n in zip(model.graph.input[0].type.tensor_type.shape.dim, image):
        d.dim_value = n
    model = onnx.shape_inference.infer_shapes(model)
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    for v in [*model.graph.value_info, *model.graph.output]:
        shapes[v.name] = [d.dim_value for d in v.type.tensor_type.shape.dim]
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    macs = {"integer": 0, "float": 0}
    for n in model.graph.node:
        if n.op_type in ("Conv", "ConvInteger", "QLinearConv"):
            weight = n.input[3] if n.op_type == "QLinearConv" else n.input[1]
            (_, c_in, kh, kw), (_, c_out, h, w) = shapes[weight], shapes[n.output[0]]
            kind = "float" if n.op_type == "Conv" and weight not in dequantized else "integer"
            macs[kind] += c_out * h * w * c_in * kh * kw
    return macs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", required=True)
    ap.add_argument("--data-root", default=env_data_root() or "../shared/data/cifar100")
    ap.add_argument("--batch", type=int_in(1), default=256)
    ap.add_argument("--threads", type=int_in(1), default=1)
    ap.add_argument("--runs", type=int_in(1), default=10)
    ap.add_argument("--teacher", help="FP32 weights spec (pretrained:resnet32_cifar100_e64): profile its graph too")
    ap.add_argument("--out", type=output_file)
    args = ap.parse_args(argv)

    import onnxruntime

    student, (mean, std), _ = source_model(args.student, args.data_root)
    graphs = {layout: build_onnx(student, normalise=normalisation(mean, std)).SerializeToString()
              for layout in ("channels-last", "ort-own")}  # fmt: skip
    if args.teacher:
        teacher, _, _ = source_model(args.teacher)
        graphs["teacher"] = build_onnx(teacher, normalise=normalisation(mean, std)).SerializeToString()
    result = {"command": " ".join(["python", "benchmarks/ort_profile.py", *(argv or sys.argv[1:])]),
              "student": args.student, "batch": args.batch, "threads": args.threads, "runs": args.runs,
              "machine": platform.processor() or platform.machine(), "device_name": _cpu_name(),
              "onnxruntime": onnxruntime.__version__, "git_sha": _git_sha(), "layouts": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="vaqkd-prof-") as tmp:
        for layout, graph in graphs.items():
            p = profile(graph, layout, args.threads, args.batch, args.runs, Path(tmp))
            result["layouts"][layout] = p
            print(f"{layout}: {p['ms_per_batch']:.1f} ms of kernel time per batch of {args.batch}, "
                  f"{sum(p['op_counts'].values())} nodes ({p['op_counts'].get('Transpose', 0)} Transpose)"
                  + "".join(f", {kind} convs {p['conv_ms_per_batch'][kind]:.1f} ms ({rate:.1f} G MAC/s)"
                            for kind, rate in p["conv_gmac_per_s"].items() if rate))  # fmt: skip
            for op, v in p["by_op"].items():
                if v["share"] >= 0.005:
                    print(f"  {op:22s} {100 * v['share']:5.1f} %  {v['ms']:7.2f} ms")
    if args.out:
        write_output(args.out, result)
    return 0


if __name__ == "__main__":
    from vaqkd.cli import run_script

    raise SystemExit(run_script(main, "benchmarks/ort_profile.py"))
