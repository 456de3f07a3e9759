"""ONNX Runtime vs PyTorch for a W2A2 run: agreement and top-1 on the whole test split, and inference speed.

    python benchmarks/deploy_onnx.py RUN_DIR --data-root ../shared/data/cifar100 --out results/deploy

Agreement: the fake-quant PyTorch model (fp32) against its ONNX graph in ONNX Runtime with all graph
optimizations (QDQ fused into QLinearConv: integer kernels), and the reference graph (float biases, no graph
optimizations: float convolutions on the exact 2-bit codes; in ORT 1.32 the basic level fuses no QDQ, the
extended level does), each also
against the same PyTorch model in float64 — the floor set by float32 rounding alone. Speed
(img/s, peak RSS), each case in a fresh process, in one run: ORT integer graph, ORT FP32 graph of the
shipped teacher (exported plainly by the same builder), PyTorch eval of the W2A2 model and of the teacher, at
batch 1 and 256, 2 threads.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

CASES = ("ort_w2a2_int", "ort_fp32_teacher", "torch_w2a2", "torch_fp32_teacher")


def speed_case(case: str, onnx_dir: Path, run: str, data_root: str | None) -> dict:
    torch.set_num_threads(2)
    if case.startswith("ort"):
        from vaqkd.deploy.onnx_export import ort_logits, session

        sess = session(onnx_dir / ("w2a2.onnx" if "w2a2" in case else "teacher.onnx"), threads=2)

        def fn(x):  # uint8 pixels for a graph that normalises inside, else the same values as floats
            return ort_logits(sess, x)
    else:
        from vaqkd.models import create_model
        from vaqkd.rundir import load_run, load_weights

        if "w2a2" in case:
            sets = ["train.device=cpu", "data.test_subset_per_class=1"]
            model = load_run(run, torch.device("cpu"), sets, data_root=data_root)[1].eval()
        else:
            model = create_model("resnet32", 100)
            load_weights(model, "pretrained", "resnet32")
            model.eval()

        def fn(x):
            with torch.no_grad():
                return model(x.float())

    out = {}
    for batch, reps in ((1, 200), (256, 8)):
        x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
        for _ in range(3):
            fn(x)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn(x)
        out[f"img_per_s_batch{batch}"] = batch * reps / (time.perf_counter() - t0)
    if case.startswith("ort"):  # where the time goes, by operator (ORT's profiler, batch 256)
        out["share_by_op_batch256"] = op_shares(onnx_dir / ("w2a2.onnx" if "w2a2" in case else "teacher.onnx"))
    # VmHWM: this process's peak resident set (ru_maxrss would include the parent's peak, kept across exec)
    hwm = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM"))
    out["peak_rss_mib"] = int(hwm.split()[1]) / 1024
    return out


def op_shares(path: Path, reps: int = 4) -> dict[str, float]:
    """Share of the graph's kernel time per operator type over `reps` runs at batch 256 (ORT profiling)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.intra_op_num_threads = 2
    opts.profile_file_prefix = str(path.with_suffix(""))
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = torch.randn(256, 3, 32, 32).numpy()
    for _ in range(reps):
        sess.run(None, {"input": x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    dur: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            dur[e["args"]["op_name"]] = dur.get(e["args"]["op_name"], 0) + e["dur"]
    total = sum(dur.values())
    return {k: round(v / total, 4) for k, v in sorted(dur.items(), key=lambda kv: -kv[1])}


def main() -> None:
    from vaqkd.cli import output_folder
    from vaqkd.rundir import run_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--data-root")
    ap.add_argument("--out", type=output_folder, default="results/deploy")
    ap.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    ap.add_argument("--onnx-dir", type=output_folder, default="runs/deploy_onnx")
    args = ap.parse_args()
    if not args.case:
        run_config(Path(args.run_dir))  # a run directory (not an artifact): said before anything is exported
    if args.case:  # a child process: one speed case
        print(json.dumps(speed_case(args.case, args.onnx_dir, args.run_dir, args.data_root)))
        return
    import onnxruntime as ort

    from vaqkd.deploy.onnx_export import build_onnx, export_onnx, export_source_onnx, ort_logits, session
    from vaqkd.models import create_model
    from vaqkd.rundir import load_run, load_weights
    from vaqkd.runner import command_line, meta

    args.onnx_dir.mkdir(parents=True, exist_ok=True)
    export_source_onnx(str(args.run_dir), args.onnx_dir / "w2a2.onnx", data_root=args.data_root)
    teacher = create_model("resnet32", 100)
    load_weights(teacher, "pretrained", "resnet32")
    export_onnx(teacher, args.onnx_dir / "teacher.onnx")
    _, model, data = load_run(args.run_dir, torch.device("cpu"), ["train.device=cpu"], data_root=args.data_root)
    model.eval()
    fused = session(args.onnx_dir / "w2a2.onnx")
    # the reference graph: float biases, no graph optimizations (ORT 1.32 fuses QDQ from the extended level on)
    unfused = session(build_onnx(model, integer=False).SerializeToString(), optimize=False)
    # the float floor: the same model in float64 (nearly exact arithmetic); fp32 PyTorch itself differs from it
    model64 = copy.deepcopy(model).double()
    names = ("torch", "ort_int", "ort_reference", "torch_fp64")
    correct, agree, agree64, n = dict.fromkeys(names, 0), dict.fromkeys(names, 0), dict.fromkeys(names, 0), 0
    with torch.no_grad():
        for i in range(0, len(data.test.labels), 500):
            x8, y = data.test.images[i : i + 500], data.test.labels[i : i + 500]
            x = (x8.float() - data.test.mean) / data.test.std  # the loader's normalisation, as the graph's
            pred = {
                "torch": model(x).argmax(1),
                "ort_int": ort_logits(fused, x8).argmax(1),
                "ort_reference": ort_logits(unfused, x).argmax(1),
                "torch_fp64": model64(x.double()).argmax(1),
            }
            for k, p in pred.items():
                correct[k] += int((p == y).sum())
                agree[k] += int((p == pred["torch"]).sum())
                agree64[k] += int((p == pred["torch_fp64"]).sum())
            n += len(y)
    agreement = {
        "test_images": n,
        "top1": {k: 100 * correct[k] / n for k in names},
        "prediction_agreement_with_torch": {k: agree[k] / n for k in names if k != "torch"},
        "prediction_agreement_with_torch_fp64": {k: agree64[k] / n for k in names if k != "torch_fp64"},
    }
    speed = {}
    for case in CASES:
        cmd = [sys.executable, __file__, args.run_dir, "--case", case, "--onnx-dir", str(args.onnx_dir)]
        cmd += ["--data-root", args.data_root] if args.data_root else []
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:  # the agreement above is printed, not lost; the case's own last line says why
            print(json.dumps(agreement, indent=2))
            why = (p.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"speed case {case} failed (exit {p.returncode}): {why}")
        speed[case] = json.loads(p.stdout.strip().splitlines()[-1])
    ratios = {f"ort_int_over_ort_fp32_batch{b}": speed["ort_w2a2_int"][f"img_per_s_batch{b}"]
              / speed["ort_fp32_teacher"][f"img_per_s_batch{b}"] for b in (1, 256)}  # fmt: skip
    res = {"run": args.run_dir, **agreement, "speed": speed, "ratios": ratios, "target_int_over_fp32_batch256": 1.5,
           "meta": {**meta("deploy_onnx", 1, [], "pretrained"), "command": command_line(),
                    "onnxruntime": ort.__version__}}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "onnx.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "meta"}, indent=2))


if __name__ == "__main__":
    from vaqkd.cli import run_script

    raise SystemExit(run_script(main, "benchmarks/deploy_onnx.py"))
