"""Where torch's int8 path spends its time: the integer-residual student compiled as `vaqkd eval --backend
torch-int8` runs it (`vaqkd.deploy.torch_int8.compile_int8`) beside the FP32 teacher quantized after training by
PT2E (`ptq_int8`, the teacher's fastest torch deployment), each under torch's profiler, by kernel.

    python benchmarks/torch_int8_profile.py --student results/deploy/qkd_logit-int8stream-full-s1.vaqkd.safetensors \
        --out results/deploy/torch_int8_profile.json

Inductor's generated loops are profiled as kernels of their own (`cpp.enable_kernel_profile`); oneDNN's convs
appear as their ops (`onednn::qconv_pointwise`, ...). Each program runs `--runs` profiled batches of `--batch`
random uint8 images on `--threads` threads after `--warm` unprofiled ones. Times are self time on the calling
thread, so with several threads an op's time is its wall time, not CPU time; `ms_per_batch` is the wall time of
a whole call without the profiler (median of the runs), of the programs compiled with the kernel-profiling hooks
(a little slower than `vaqkd eval`'s). Grouped: `conv` (every conv: the int8 ones and a float stem), `linear`,
`loops` (inductor's fused elementwise loops: quantize, dequantize, add, clamp), `other`; `conv_gmac_per_s` is the
model's conv and linear multiply-adds (forward hooks, one 32x32 image) over the `conv` group's time. Nothing else
heavy may run meanwhile."""

from __future__ import annotations

import argparse
import collections
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from infer import _cpu_name, _git_sha  # noqa: E402

from vaqkd.cli import int_in, output_file, write_output  # noqa: E402
from vaqkd.data.build import env_data_root  # noqa: E402
from vaqkd.deploy.artifact import ExportError  # noqa: E402
from vaqkd.deploy.onnx_export import normalisation, source_model  # noqa: E402
from vaqkd.quant.convert import quantizers  # noqa: E402


def model_macs(model: torch.nn.Module) -> int:
    """Multiply-adds of one 32x32 image through the model's convs and linear layers (counted by forward hooks)."""
    total = 0

    def count(m, inputs, out):
        nonlocal total
        if isinstance(m, torch.nn.Conv2d):
            total += out[0].numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += m.in_features * m.out_features

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    hooks = [m.register_forward_hook(count) for m in layers]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, 32, 32))
    finally:
        for h in hooks:
            h.remove()
    return total


def group(name: str) -> str:
    """The kind of a profiled op: the oneDNN convs, linear layers, inductor's fused loops, or the rest."""
    low = name.lower()
    if "conv" in low:
        return "conv"
    if "linear" in low or "addmm" in low or "mm" == low.rsplit("::", 1)[-1]:
        return "linear"
    if "cpp_fused" in low or low.startswith("kernel_cpp"):
        return "loops"
    return "other"


def profile(run, batch: int, threads: int, runs: int, warm: int, macs: int) -> dict:
    """Per op: ms per batch (self time) and share; per group; and the wall time of a call without the profiler."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(threads)
    x = np.random.default_rng(0).integers(0, 256, (batch, 3, 32, 32), dtype=np.uint8)
    for _ in range(warm):
        run(x)
    wall = []
    for _ in range(runs):
        t = time.perf_counter()
        run(x)
        wall.append(time.perf_counter() - t)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            run(x)
    by_op, calls = collections.Counter(), collections.Counter()
    for e in prof.key_averages():
        if e.self_cpu_time_total > 0:
            by_op[e.key] += e.self_cpu_time_total
            calls[e.key] += e.count
    total = sum(by_op.values())
    groups = collections.Counter()
    for op, us in by_op.items():
        groups[group(op)] += us
    ms = statistics.median(wall) * 1e3
    conv_ms = groups["conv"] / runs / 1e3
    return {"ms_per_batch": ms, "img_per_s": batch / ms * 1e3, "profiled_ms_per_batch": total / runs / 1e3,
            "groups": {g: {"ms": v / runs / 1e3, "share": v / total} for g, v in groups.most_common()},
            "conv_gmac_per_s": macs * batch / conv_ms / 1e6 if conv_ms > 0 else None,
            "by_op": {k: {"ms": v / runs / 1e3, "share": v / total, "calls_per_batch": calls[k] / runs}
                      for k, v in by_op.most_common(25)}}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", required=True, help="an integer-residual run or packed artifact")
    ap.add_argument("--teacher", default="pretrained:resnet32_cifar100_e64", help="FP32 weights spec")
    ap.add_argument("--data-root", default=env_data_root() or "../shared/data/cifar100",
                    help="CIFAR root: the teacher's 512 calibration images")  # fmt: skip
    ap.add_argument("--batch", type=int_in(1), default=256)
    ap.add_argument("--threads", type=int_in(1), default=2)
    ap.add_argument("--runs", type=int_in(1), default=10)
    ap.add_argument("--warm", type=int_in(1), default=3)
    ap.add_argument("--out", type=output_file)
    args = ap.parse_args(argv)

    import torch._inductor.config as inductor_config

    from vaqkd.data.cifar import load_split
    from vaqkd.deploy.torch_int8 import compile_int8, ptq_int8

    inductor_config.cpp.enable_kernel_profile = True  # each generated loop a profiler event of its own
    student, (mean, std), meta = source_model(args.student, args.data_root)
    if not quantizers(student):
        raise ExportError(f"--student {args.student}: an FP32 model (no quantizer): give an integer-residual one")
    teacher, _, _ = source_model(args.teacher)
    if quantizers(teacher):
        raise ExportError(f"--teacher {args.teacher}: a quantized model: give the FP32 teacher's weights")
    norm = normalisation(mean, std)
    example = torch.zeros(args.batch, 3, 32, 32, dtype=torch.uint8)
    calib = load_split(meta.get("dataset", "cifar100"), args.data_root, train=True)[0][:512]
    torch.set_num_threads(args.threads)
    macs = {"w2a2": model_macs(student), "teacher": model_macs(teacher)}
    programs = {"w2a2/torch-int8/int8": compile_int8(student, *norm, example=example),
                "teacher/torch-int8/int8-ptq": ptq_int8(teacher, *norm, calibration=calib, example=example)}
    result = {"command": " ".join(["python", "benchmarks/torch_int8_profile.py", *(argv or sys.argv[1:])]),
              "student": args.student, "teacher": args.teacher, "batch": args.batch, "threads": args.threads,
              "runs": args.runs, "machine": platform.processor() or platform.machine(), "device_name": _cpu_name(),
              "torch": torch.__version__, "git_sha": _git_sha(), "macs_per_image": macs, "programs": {}}  # fmt: skip
    for name, run in programs.items():
        p = profile(run, args.batch, args.threads, args.runs, args.warm, macs[name.split("/")[0]])
        result["programs"][name] = p
        rate = f", convs {p['conv_gmac_per_s']:.0f} G MAC/s" if p["conv_gmac_per_s"] else ""
        print(f"{name}: {p['ms_per_batch']:.1f} ms a batch of {args.batch} ({p['img_per_s']:.0f} img/s){rate}")
        for g, v in p["groups"].items():
            print(f"  {g:6s} {100 * v['share']:5.1f} %  {v['ms']:7.2f} ms")
        for op, v in list(p["by_op"].items())[:8]:
            print(f"    {op[:60]:60s} {100 * v['share']:5.1f} %  {v['ms']:7.2f} ms  x{v['calls_per_batch']:.0f}")
    if args.out:
        write_output(args.out, result)
    return 0


if __name__ == "__main__":
    from vaqkd.cli import run_script

    raise SystemExit(run_script(main, "benchmarks/torch_int8_profile.py"))
