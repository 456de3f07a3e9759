"""Inference runtimes for an exported ONNX graph, behind one interface: `compile_graph(runtime, graph)` -> a function
from a batch of uint8 images (N, C, H, W) (or normalised floats, for a graph built without `normalise`) to logits.

    onnxruntime  ONNX Runtime's CPU provider: its fusions (QDQ -> QLinearConv / QLinearAdd), then the integer
                 body in channels-last and its requantizations in codes (`ort_layout`: no transposes around
                 each integer conv, a QLinearMul where ORT has DequantizeLinear -> QuantizeLinear and both give
                 the same codes), every other ORT optimization as ORT alone; each instance's first batch also
                 runs in ORT's own graph and must give the same logits bit for bit (a guard against a faulty
                 rewrite, not a proof);
                 `channels_last=False`: ORT's own graph
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

import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from vaqkd.errors import RunFileError


def _ort(graph, threads: int, precision: str, streams: int, channels_last: bool = True):
    """`streams` functions, each its own session of threads/streams threads; with `channels_last`, a graph with
    integer convs runs as `ort_layout.channels_last` rewrites it (rewritten once, checked per instance on its
    first batch; `run.layout` says which ran)."""
    from vaqkd.deploy.onnx_export import session

    if precision != "f32":
        raise ValueError(f"onnxruntime: precision {precision!r} (the CPU provider runs the graph as it is: f32)")
    per = threads // streams
    fast = _channels_last_graph(graph) if channels_last else None
    runs = []
    for _ in range(streams):
        sess = None
        if fast is not None:
            try:  # every ORT optimization on the rewrite too: the float stem in its blocked kernel, as ORT alone
                sess = session(fast, per)
            except Exception as e:  # noqa: BLE001 - a rewrite ORT refuses: ORT's own graph, said once
                warnings.warn(f"onnxruntime: the channels-last graph does not load ({type(e).__name__}); running "
                              "ORT's own layout", stacklevel=3)  # fmt: skip
                fast = None
        if sess is None:
            runs.append(_ort_run(session(graph, per), None))
        else:
            runs.append(_ort_run(sess, lambda: session(graph, per)))
    return runs


def _channels_last_graph(graph) -> bytes | None:
    """`ort_layout.channels_last_graph`, or None where it fails (said once): an optimisation, never a reason not to
    run the graph; a damaged or foreign graph raises its one-line error instead."""
    from vaqkd.deploy import ort_layout

    try:
        return ort_layout.channels_last_graph(graph)
    except RunFileError:
        raise
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"onnxruntime: no channels-last graph ({_reason(e)}); running ORT's own layout", stacklevel=4)
        return None


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e) else type(e).__name__


def _ort_run(sess, check):
    """A function over a session. With `check` (-> ORT's own session of the same graph), the first batch also runs
    there; the channels-last session is kept only if its logits are bit for bit ORT's own, else ORT's own runs
    from then on (said once)."""
    name, kind = sess.get_inputs()[0].name, sess.get_inputs()[0].type
    state = {"sess": sess, "check": check}

    def run(x: np.ndarray) -> np.ndarray:
        feed = {name: x if kind == "tensor(uint8)" else x.astype(np.float32)}
        if state["check"] is None:
            return state["sess"].run(None, feed)[0]
        own, state["check"] = state["check"](), None
        want = own.run(None, feed)[0]
        try:
            got = state["sess"].run(None, feed)[0]
        except Exception as e:  # noqa: BLE001 - checked once, falls back
            got, why = None, _reason(e)
        else:
            why = "its logits differ from ORT's own graph's"
        if got is None or not np.array_equal(got, want):
            warnings.warn(f"onnxruntime: the channels-last graph is not used ({why}); running ORT's own layout",
                          stacklevel=2)  # fmt: skip
            state["sess"] = own
            run.layout = "ort"
        return want

    run.input_type = "uint8" if kind == "tensor(uint8)" else "float32"
    run.layout = "channels-last" if check is not None else "ort"
    return run


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
    try:
        compiled = core.compile_model(model, "CPU", config)
    except Exception as e:  # a file from outside that it reads but cannot build (an op or a shape it refuses)
        if isinstance(graph, bytes):  # a graph this vaqkd built: a bug, with its traceback
            raise
        raise RunFileError(f"{graph}: OpenVINO cannot compile it ({_reason(e)})") from None
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
                  streams: int = 1, channels_last: bool = True):  # fmt: skip
    """A function uint8 images (N, C, H, W) -> logits (N, K) running `graph` in `runtime` on `threads` threads
    (0: the runtime's default), as `streams` instances that share each batch (see the module docstring;
    streams > 1 needs threads, a multiple of streams). `channels_last` (onnxruntime only): run the integer body
    in NHWC as `ort_layout.channels_last` rewrites it, checked on each instance's first batch; False: as ORT
    optimises it alone."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; available: {sorted(RUNTIMES)}")
    if streams < 1 or (streams > 1 and (threads < streams or threads % streams)):
        raise ValueError(f"streams={streams} with threads={threads}: streams split the threads, so threads must be "
                         "a multiple of streams (and given)")
    if not isinstance(graph, bytes) and not Path(graph).is_file():
        what = "is a directory, not an ONNX file" if Path(graph).is_dir() else "file missing"
        raise RunFileError(f"{graph}: {what}")
    extra = {"channels_last": channels_last} if runtime == "onnxruntime" else {}
    runs = RUNTIMES[runtime](graph if isinstance(graph, bytes) else Path(graph), threads, precision, streams, **extra)
    return runs[0] if streams == 1 else _split(runs)


def _split(runs: list):
    """One function over several instances: each batch cut into len(runs) contiguous parts run at once."""
    pool = ThreadPoolExecutor(len(runs), thread_name_prefix="vaqkd-stream")

    def run(x: np.ndarray) -> np.ndarray:
        parts = [p for p in np.array_split(x, len(runs)) if len(p)]
        out = np.concatenate(list(pool.map(lambda rp: rp[0](rp[1]), zip(runs, parts))))
        run.layout = _layout(runs)
        return out

    run.input_type = runs[0].input_type
    run.streams = len(runs)
    run.layout = _layout(runs)
    return run


def _layout(runs) -> str | None:
    """What the instances run: their one layout, or "mixed" where some fell back."""
    kinds = {getattr(r, "layout", None) for r in runs}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def evaluate_graph(run, images: torch.Tensor, labels: torch.Tensor, batch: int = 500,
                   normalise: tuple | None = None, source: str | Path | None = None,
                   num_classes: int | None = None, name: str | Path | None = None) -> dict[str, float]:  # fmt: skip
    """Top-1 of a compiled graph over uint8 images; `normalise` = (mean255, std255) where the graph takes
    normalised floats (a graph exported before the input moved inside), computed as the loader does. `source`: the
    file the graph came from (a file from outside): a runtime failure while it runs is a RunFileError naming it.
    Logits must be (batch, classes) for every batch (a graph that gives one row for the batch is refused, not
    broadcast against the labels), with `num_classes` classes where given (the dataset's). `name`: what the
    messages call the graph (the file it was exported from), where `source` is not given."""
    correct, where = 0, source if source is not None else name if name is not None else "the graph"
    for i in range(0, len(labels), batch):
        x = images[i : i + batch].cpu()
        if run.input_type != "uint8":
            if normalise is None:
                raise RunFileError("the graph takes normalised floats: give the normalisation")
            m, s = (torch.as_tensor(v).view(1, -1, 1, 1) for v in normalise)
            x = (x.float() - m) / s
        try:
            logits = run(x.numpy())
        except Exception as e:
            if source is None:  # a graph this vaqkd built: a failure is a bug, with its traceback
                raise
            raise RunFileError(f"{source}: the runtime failed running it ({_reason(e)})") from None
        if np.ndim(logits) != 2 or np.shape(logits)[0] != len(x):
            raise RunFileError(f"{where}: gives logits of shape {tuple(np.shape(logits))} for a batch of {len(x)} "
                               "images (wanted (images, classes))")  # fmt: skip
        if num_classes is not None and np.shape(logits)[1] != num_classes:
            raise RunFileError(f"{where}: gives {np.shape(logits)[1]} classes; the test split has {num_classes}")
        correct += int((torch.from_numpy(np.asarray(logits)).argmax(1) == labels[i : i + batch].cpu()).sum())
    return {"top1": 100.0 * correct / len(labels)}
