"""Inference speed and agreement of a W2A2 student against its FP32 teacher, in every runtime, in one run.

    python benchmarks/infer.py --student STUDENT --teacher pretrained:resnet32_cifar100_e64 \
        --data-root ../shared/data/cifar100 --out results/deploy/infer.json

STUDENT: a packed artifact or a finished run directory. Both models are exported by the same builder
(`vaqkd.deploy.onnx_export`: uint8 input, normalised inside) and compiled in ONNX Runtime (f32; a graph with integer
convs runs its integer body channels-last, `vaqkd.deploy.ort_layout`; `--ort-own-layout` adds the W2A2 graph as
ORT lays it out alone, named `ort-own`, measured against the same teacher, and the backend's per-round ratio to
it) and OpenVINO
(inference precision f32; the teacher also in bf16, named so: its predictions move, see `agreement`); with
`--torch-int8` also torch's int8 path (`vaqkd.deploy.torch_int8`: the student's own arithmetic as oneDNN int8
convs, and the teacher quantized to 8 bits after training by PT2E, `int8-ptq`, another model). Speed: img/s at
batch 1 and 256, 1 and 2 threads, and with `--streams S` (default 2) each runtime also as S instances that share
the batch and the threads (`compile_graph(streams=S)`, named `RUNTIME-xS`; where the threads and the batch divide
among S); for each (batch, threads) every case is timed once per round, the rounds interleaved (`--rounds`), and
each ratio is taken within a round (W2A2 / teacher in the same runtime and streams, / the teacher's best in that
runtime and precision with or without streams, and W2A2 in its fastest runtime / the teacher's fastest deployment
in any runtime and precision): medians and the spread (min-max) of the per-round ratios. The floor: the MAC rate of
a large int8 and fp32 GEMM measured here (torch._int_mm, torch.mm, on the same threads) -> the img/s a 68.87 M-MAC
ResNet-32 would reach at that rate; each case's share of it says how far the runtime is from the machine.
Agreement: each runtime's predictions against the PyTorch model (fp32, the same uint8 images through the loader's
normalisation) on the test split. Nothing else heavy may run meanwhile (figures are for a quiet machine)."""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vaqkd.cli import int_in, output_file, write_output  # noqa: E402
from vaqkd.data.build import env_data_root  # noqa: E402
from vaqkd.deploy.artifact import ExportError  # noqa: E402
from vaqkd.deploy.onnx_export import build_onnx, normalisation, source_model  # noqa: E402
from vaqkd.deploy.runtimes import compile_graph  # noqa: E402
from vaqkd.quant.convert import quantizers  # noqa: E402


def gemm_rate(threads: int, dtype: str, n: int = 2048, reps: int = 5) -> float:
    """MAC/s of an n x n x n matrix product (the best of `reps`) on `threads` threads."""
    torch.set_num_threads(threads)
    if dtype == "int8":
        a = torch.randint(-64, 64, (n, n), dtype=torch.int8)
        b = torch.randint(-64, 64, (n, n), dtype=torch.int8)
        f = lambda: torch._int_mm(a, b)  # noqa: E731
    else:
        a, b = torch.randn(n, n), torch.randn(n, n)
        f = lambda: torch.mm(a, b)  # noqa: E731
    f()
    best = min(_timed(f) for _ in range(reps))
    return n**3 / best


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def time_case(run, x: np.ndarray, min_s: float = 0.4) -> float:
    """img/s of one case: calls repeated until `min_s` seconds have passed (after one warm call)."""
    run(x)
    n, t0 = 0, time.perf_counter()
    while True:
        run(x)
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_s:
            return n * len(x) / dt


def agreement(cases: dict, models: dict, images: torch.Tensor, labels: torch.Tensor, norm) -> dict:
    """Per case: share of the test images on which it predicts what the PyTorch model predicts, and its top-1."""
    m255, s255 = (torch.from_numpy(a).view(1, -1, 1, 1) for a in norm)
    out = {}
    preds = {}
    with torch.no_grad():
        for name, model in models.items():
            preds[name] = torch.cat([model((images[i : i + 500].float() - m255) / s255).argmax(1)
                                     for i in range(0, len(labels), 500)])  # fmt: skip
    for key, run in cases.items():
        model_name = key.split("/")[0]
        got = torch.cat([torch.from_numpy(run(images[i : i + 500].numpy())).argmax(1)
                         for i in range(0, len(labels), 500)])  # fmt: skip
        out[key] = {"agreement_with_torch": float((got == preds[model_name]).float().mean()),
                    "top1": 100 * float((got == labels).float().mean()),
                    "torch_top1": 100 * float((preds[model_name] == labels).float().mean())}  # fmt: skip
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", required=True, help="a packed artifact or a finished run directory")
    ap.add_argument("--teacher", default="pretrained:resnet32_cifar100_e64", help="FP32 weights spec")
    ap.add_argument("--data-root", default=env_data_root() or "../shared/data/cifar100")
    ap.add_argument("--rounds", type=int_in(1), default=5)
    ap.add_argument("--batches", type=int_in(1), nargs="+", default=[1, 256])
    ap.add_argument("--threads", type=int_in(1), nargs="+", default=[1, 2])
    ap.add_argument("--streams", type=int_in(1), default=2,
                    help="also every runtime as this many instances sharing batch and threads (1: not)")
    ap.add_argument("--agreement-images", type=int_in(0, 10000), default=10000,
                    help="test images for agreement (0: skip)")  # fmt: skip
    ap.add_argument("--torch-int8", action="store_true",
                    help="also torch's int8 path (vaqkd.deploy.torch_int8; needs torchao): the integer-residual "
                    "student as oneDNN int8 convs, the teacher quantized to 8 bits by PT2E (named int8-ptq)")
    ap.add_argument("--ort-own-layout", action="store_true",
                    help="also the W2A2 graph in ORT as ORT lays it out alone (named ort-own; the onnxruntime case "
                    "runs its integer body channels-last, vaqkd.deploy.ort_layout)")
    ap.add_argument("--out", type=output_file)
    args = ap.parse_args(argv)

    student, (mean, std), meta = source_model(args.student, args.data_root)
    if not quantizers(student):
        raise ExportError(f"--student {args.student}: an FP32 model (no quantizer): give a quantized run or artifact")
    teacher, _, _ = source_model(args.teacher)
    if quantizers(teacher):
        raise ExportError(f"--teacher {args.teacher}: a quantized model: give the FP32 teacher's weights")
    test_split = None
    if args.agreement_images:  # read (or downloaded) before the timing: a data root that fails, fails first
        from vaqkd.data.cifar import load_split

        test_split = load_split(meta.get("dataset", "cifar100"), args.data_root, train=False)
    norm = normalisation(mean, std)
    graphs = {"w2a2": build_onnx(student, normalise=norm).SerializeToString(),
              "teacher": build_onnx(teacher, normalise=norm).SerializeToString()}  # fmt: skip
    variants = [("onnxruntime", "f32"), ("openvino", "f32")]
    keys = [f"{m}/{rt}/{p}" for m in graphs for rt, p in variants] + ["teacher/openvino/bf16"]
    split_keys = [f"{m}/{rt}-x{args.streams}/{p}" for m in graphs for rt, p in variants]
    split_keys += [f"teacher/openvino-x{args.streams}/bf16"]
    if args.ort_own_layout:
        keys.insert(1, "w2a2/ort-own/f32")
        split_keys.insert(1, f"w2a2/ort-own-x{args.streams}/f32")
    torch_cases = {}
    if args.torch_int8:  # torch's int8 path: the student's own arithmetic, the teacher quantized after training
        from vaqkd.data.cifar import load_split
        from vaqkd.deploy.torch_int8 import compile_int8, ptq_int8

        example = torch.zeros(args.batches[0], 3, 32, 32, dtype=torch.uint8)
        calib = load_split(meta.get("dataset", "cifar100"), args.data_root, train=True)[0][:512]
        torch_cases = {"w2a2/torch-int8/int8": compile_int8(student, *norm, example=example),
                       "teacher/torch-int8/int8-ptq": ptq_int8(teacher, *norm, calibration=calib, example=example)}
        keys += list(torch_cases)

    def keys_for(threads, batch=None):
        """The cases at this thread count (and batch): the split ones where threads and batch divide."""
        s = args.streams
        split = s > 1 and threads >= s and threads % s == 0 and (batch is None or batch >= s)
        return keys + split_keys if split else list(keys)

    def compiled(threads):
        out = {}
        for k in keys_for(threads):
            model, rt, prec = k.split("/")
            if k in torch_cases:
                out[k] = _threaded(torch_cases[k], threads)
            else:
                rt, streams = _runtime_streams(rt)
                own = rt == "ort-own"  # ONNX Runtime as it lays the graph out alone
                out[k] = compile_graph("onnxruntime" if own else rt, graphs[model], threads, prec, streams=streams,
                                       **({"channels_last": False} if own else {}))
        return out

    result = {"command": " ".join(["python", "benchmarks/infer.py", *(argv or sys.argv[1:])]),
              "student": args.student, "teacher": args.teacher, "machine": platform.processor() or platform.machine(),
              "device_name": _cpu_name(), "torch": torch.__version__, "git_sha": _git_sha(), "rounds": args.rounds,
              "macs_per_image": 68_868_352, "speed": {}, "floor": {}}  # fmt: skip
    try:
        import onnxruntime
        import openvino

        result["onnxruntime"], result["openvino"] = onnxruntime.__version__, openvino.__version__
    except ImportError:
        pass
    for threads in args.threads:
        rates = {d: gemm_rate(threads, d) for d in ("int8", "fp32")}
        result["floor"][f"threads{threads}"] = {f"{d}_gemm_mac_per_s": r for d, r in rates.items()}
        print(f"{threads} thread(s): int8 GEMM {rates['int8'] / 1e9:.0f} G MAC/s (a ResNet-32 at that rate: "
              f"{rates['int8'] / 68_868_352:.0f} img/s), fp32 GEMM {rates['fp32'] / 1e9:.0f} G MAC/s")
        cases = compiled(threads)
        for batch in args.batches:
            x = np.random.default_rng(0).integers(0, 256, (batch, 3, 32, 32), dtype=np.uint8)
            cell_keys = keys_for(threads, batch)
            per_round = {k: [] for k in cell_keys}
            for _ in range(args.rounds):  # interleaved: every case once per round
                for k in cell_keys:
                    per_round[k].append(time_case(cases[k], x, 0.2 if batch == 1 else 0.5))
            fastest_teacher = [max(per_round[k][r] for k in cell_keys if k.startswith("teacher"))
                               for r in range(args.rounds)]  # fmt: skip
            cell = {}
            for k in cell_keys:
                ips = per_round[k]
                c = {"img_per_s": statistics.median(ips), "img_per_s_rounds": ips,
                     "layout": getattr(cases[k], "layout", None),
                     "share_of_int8_gemm_floor": statistics.median(ips) * 68_868_352 / rates["int8"]}  # fmt: skip
                if k.startswith("w2a2"):
                    same = [a / b for a, b in zip(ips, per_round[_teacher_key(k)])]
                    best = [a / b for a, b in zip(ips, fastest_teacher)]
                    # the teacher in this runtime and precision as it runs fastest (one instance or streams)
                    rivals = [t for t in cell_keys if _same_runtime(t, _teacher_key(k))]
                    rt_best = [a / max(per_round[t][r] for t in rivals) for r, a in enumerate(ips)]
                    c.update(vs_teacher_same_runtime=statistics.median(same), vs_teacher_spread=[min(same), max(same)],
                             vs_teacher_best_same_runtime=statistics.median(rt_best),
                             vs_teacher_best_same_runtime_spread=[min(rt_best), max(rt_best)],
                             vs_fastest_teacher=statistics.median(best),
                             vs_fastest_teacher_spread=[min(best), max(best)])  # fmt: skip
                    own = k.replace("/onnxruntime", "/ort-own")  # the ORT backend against ORT's own layout
                    if own != k and own in per_round:
                        r = [a / b for a, b in zip(ips, per_round[own])]
                        c.update(vs_ort_own_layout=statistics.median(r), vs_ort_own_layout_spread=[min(r), max(r)])
                cell[k] = c
            result["speed"][f"batch{batch}_threads{threads}"] = cell
            _print_cell(batch, threads, cell)
    if test_split is not None:
        images, labels = test_split
        images, labels = images[: args.agreement_images], labels[: args.agreement_images]
        result["agreement"] = agreement(compiled(2), {"w2a2": student, "teacher": teacher}, images, labels, norm)
        result["agreement_images"] = len(labels)
        for k, v in result["agreement"].items():
            print(f"{k:28s} agreement {100 * v['agreement_with_torch']:6.2f} %  top-1 {v['top1']:.2f} "
                  f"(PyTorch {v['torch_top1']:.2f})")  # fmt: skip
    if args.out:
        write_output(args.out, result)
    return 0


def _teacher_key(key: str) -> str:
    """The teacher's case in the W2A2 case's runtime (in torch-int8: the teacher's 8-bit PT2E quantization)."""
    _, rt, prec = key.split("/")
    return f"teacher/{rt}/int8-ptq" if rt == "torch-int8" else f"teacher/{rt.replace('ort-own', 'onnxruntime')}/{prec}"


def _runtime_streams(rt: str) -> tuple[str, int]:
    """A case's runtime name -> (runtime, streams): "openvino-x2" -> ("openvino", 2), "openvino" -> (.., 1)."""
    name, _, streams = rt.partition("-x")
    return name, int(streams or 1)


def _same_runtime(a: str, b: str) -> bool:
    """Two cases of one model, runtime (with or without streams) and precision."""
    (ma, ra, pa), (mb, rb, pb) = a.split("/"), b.split("/")
    base = lambda r: _runtime_streams(r)[0].replace("ort-own", "onnxruntime")  # noqa: E731
    return ma == mb and pa == pb and base(ra) == base(rb)


def _threaded(run, threads: int):
    """A torch case on `threads` threads (torch's thread count is global: set at every call)."""

    def call(x):
        torch.set_num_threads(threads)
        return run(x)

    call.input_type = run.input_type
    return call


def _print_cell(batch, threads, cell):
    print(f"batch {batch}, {threads} thread(s)")
    for k, c in cell.items():
        extra = ""
        if "vs_teacher_same_runtime" in c:
            lo, hi = c["vs_teacher_spread"]
            extra = (f"  x{c['vs_teacher_same_runtime']:.2f} teacher same runtime [{lo:.2f}, {hi:.2f}], "
                     f"x{c['vs_teacher_best_same_runtime']:.2f} its best there, "
                     f"x{c['vs_fastest_teacher']:.2f} fastest teacher")  # fmt: skip
        if "vs_ort_own_layout" in c:
            lo, hi = c["vs_ort_own_layout_spread"]
            extra += f", x{c['vs_ort_own_layout']:.2f} ORT's own layout [{lo:.2f}, {hi:.2f}]"
        share = 100 * c["share_of_int8_gemm_floor"]
        print(f"  {k:28s} {c['img_per_s']:9.0f} img/s  {share:5.1f} % of int8 floor{extra}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _git_sha() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


if __name__ == "__main__":
    from vaqkd.cli import run_script

    raise SystemExit(run_script(main, "benchmarks/infer.py"))
