"""Inference runtimes for an exported ONNX graph, behind one interface: `compile_graph(runtime, graph)` -> a function
from a batch of uint8 images (N, C, H, W) (or normalised floats, for a graph built without `normalise`) to logits.

    onnxruntime  ONNX Runtime's CPU provider, every graph optimization on (QDQ -> QLinearConv / QLinearAdd)
    openvino     OpenVINO's CPU plugin, inference precision f32 (its default on a bf16-capable CPU is bf16, which
                 moves the 2-bit graph's predictions: see benchmarks/infer.py); `precision="bf16"` is for the
                 FP32 teacher's comparison graph only, named so wherever it is measured

Both are optional extras (`pip install 'vaqkd[deploy]'`: onnx, onnxruntime, openvino). A graph is a path or the
serialized bytes of an ONNX model.

Streams, for throughput on large batches: `streams=S` splits the `threads` into S independent instances of the
graph (ONNX Runtime: S sessions of threads/S threads; OpenVINO: one model compiled with S streams and S infer
requests), cuts each batch into S contiguous parts and runs them at once (both runtimes release the GIL); the
logits are the parts' in order. A 2-bit graph's small integer convolutions scale poorly over the threads of one
instance and well over instances (benchmarks/infer.py). Each image's logits do not depend on the split in the
runtimes measured (checked in the tests), but nothing guarantees it: a float conv may pick another kernel for
another batch size.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from vaqkd.errors import RunFileError


def _ort(graph, threads: int, precision: str, streams: int):
    """`streams` functions, each its own session of threads/streams threads."""
    from vaqkd.deploy.onnx_export import session

    if precision != "f32":
        raise ValueError(f"onnxruntime: precision {precision!r} (the CPU provider runs the graph as it is: f32)")
    runs = []
    for _ in range(streams):
        sess = session(graph, threads // streams)
        name, kind = sess.get_inputs()[0].name, sess.get_inputs()[0].type

        def run(x: np.ndarray, sess=sess, name=name, kind=kind) -> np.ndarray:
            return sess.run(None, {name: x if kind == "tensor(uint8)" else x.astype(np.float32)})[0]

        run.input_type = "uint8" if kind == "tensor(uint8)" else "float32"
        runs.append(run)
    return runs


def _openvino(graph, threads: int, precision: str, streams: int):
    """`streams` functions, each its own infer request of one model compiled with `streams` streams."""
    import openvino as ov  # optional extra: pip install 'vaqkd[deploy]'

    if precision not in ("f32", "bf16"):
        raise ValueError(f"openvino: precision must be f32 or bf16, got {precision!r}")
    core = ov.Core()
    try:
        model = core.read_model(model=graph) if isinstance(graph, bytes) else core.read_model(str(graph))
    except Exception as e:  # a damaged or foreign file
        reason = str(e).splitlines()[0][:160] if str(e) else ""
        where = "graph" if isinstance(graph, bytes) else graph
        raise RunFileError(f"{where}: OpenVINO cannot read it ({type(e).__name__}: {reason})") from None
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
    if streams > 1:
        config.update(PERFORMANCE_HINT="THROUGHPUT", NUM_STREAMS=streams)
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(model, "CPU", config)
    kind = model.inputs[0].get_element_type().get_type_name()
    runs = []
    for _ in range(streams):
        request = compiled.create_infer_request()

        def run(x: np.ndarray, request=request) -> np.ndarray:
            request.infer({0: x if kind == "u8" else x.astype(np.float32)})
            return request.get_output_tensor(0).data.copy()

        run.input_type = "uint8" if kind == "u8" else "float32"
        runs.append(run)
    return runs


RUNTIMES: dict[str, Callable] = {"onnxruntime": _ort, "openvino": _openvino}


def compile_graph(runtime: str, graph: str | Path | bytes, threads: int = 0, precision: str = "f32",
                  streams: int = 1):  # fmt: skip
    """A function uint8 images (N, C, H, W) -> logits (N, K) running `graph` in `runtime` on `threads` threads
    (0: the runtime's default), as `streams` instances that share each batch (see the module docstring;
    streams > 1 needs threads, a multiple of streams)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; available: {sorted(RUNTIMES)}")
    if streams < 1 or (streams > 1 and (threads < streams or threads % streams)):
        raise ValueError(f"streams={streams} with threads={threads}: streams split the threads, so threads must be "
                         "a multiple of streams (and given)")
    if not isinstance(graph, bytes) and not Path(graph).is_file():
        raise RunFileError(f"{graph}: file missing")
    runs = RUNTIMES[runtime](graph if isinstance(graph, bytes) else Path(graph), threads, precision, streams)
    return runs[0] if streams == 1 else _split(runs)


def _split(runs: list):
    """One function over several instances: each batch cut into len(runs) contiguous parts run at once."""
    pool = ThreadPoolExecutor(len(runs), thread_name_prefix="vaqkd-stream")

    def run(x: np.ndarray) -> np.ndarray:
        parts = [p for p in np.array_split(x, len(runs)) if len(p)]
        return np.concatenate(list(pool.map(lambda rp: rp[0](rp[1]), zip(runs, parts))))

    run.input_type = runs[0].input_type
    run.streams = len(runs)
    return run


def evaluate_graph(run, images: torch.Tensor, labels: torch.Tensor, batch: int = 500,
                   normalise: tuple | None = None) -> dict[str, float]:  # fmt: skip
    """Top-1 of a compiled graph over uint8 images; `normalise` = (mean255, std255) where the graph takes
    normalised floats (a graph exported before the input moved inside), computed as the loader does."""
    correct = 0
    for i in range(0, len(labels), batch):
        x = images[i : i + batch].cpu()
        if run.input_type != "uint8":
            if normalise is None:
                raise RunFileError("the graph takes normalised floats: give the normalisation")
            m, s = (torch.as_tensor(v).view(1, -1, 1, 1) for v in normalise)
            x = (x.float() - m) / s
        logits = run(x.numpy())
        correct += int((torch.from_numpy(logits).argmax(1) == labels[i : i + batch].cpu()).sum())
    return {"top1": 100.0 * correct / len(labels)}
