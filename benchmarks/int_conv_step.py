"""What the integer forward convolution (`quant.intconv`) does to the W2A2 training step: the same W2A2 step with
its quantized convolutions' forward as the integer convolution (the default on the CPU in float32) and as the
float32 convolution (`VAQKD_INT_CONV=0`, the arithmetic before it), float and integer residual, interleaved with
the FP32 step in rounds whose order reverses every other round.

    python benchmarks/int_conv_step.py --threads 2 --rounds 20 --out results/bench/int_conv_step_intel_amx.json

Synthetic CIFAR-sized batch, CE only, SGD, fp32; run it on a quiet machine: every figure is a median of one run,
the ratios per round with their quartiles.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch
from step_floor import _quartiles, _step, parse_args, synthetic_batch

from vaqkd import bench
from vaqkd.engine.setup import environment
from vaqkd.quant import intconv


def main() -> None:
    args = parse_args(__doc__)
    if not intconv.enabled():
        raise SystemExit("int_conv_step: no integer convolution here (oneDNN int8 on x86, VAQKD_INT_CONV unset)")
    dev = torch.device("cpu")
    x, y, idx, labels = synthetic_batch(args.batch)

    def case(residual: str | None, integer: bool):
        model = bench._student(None if residual is None else 2, "lsq", "lsq", x, dev, False, residual or "float")
        step = _step(model, x, y, idx, labels, None)

        def fn():
            os.environ["VAQKD_INT_CONV"] = "1" if integer else "0"
            step()

        return fn

    steps = {"fp32": case(None, False)}
    for residual in ("float", "int"):
        for integer in (True, False):
            steps[f"w2a2_{residual}_residual_{'int' if integer else 'float'}_conv"] = case(residual, integer)
    try:
        for fn in steps.values():
            for _ in range(3):
                fn()
        times: dict[str, list[float]] = {k: [] for k in steps}
        for r in range(args.rounds):
            for k in list(steps)[:: 1 if r % 2 == 0 else -1]:
                t0 = time.perf_counter()
                steps[k]()
                times[k].append(time.perf_counter() - t0)
    finally:
        os.environ.pop("VAQKD_INT_CONV", None)

    def ratios(a: str, b: str) -> list[float]:  # per-round throughput of a over b's
        return _quartiles([tb / ta for ta, tb in zip(times[a], times[b])])

    cases = {}
    for k, v in times.items():
        q = ratios(k, "fp32")
        cases[k] = {"ms_per_step": 1e3 * statistics.median(v), "over_fp32_quartiles": q}
        print(f"{k:36s} {1e3 * statistics.median(v):7.1f} ms   throughput / FP32 {q[1]:.3f} [{q[0]:.3f}, {q[2]:.3f}]")
    for residual in ("float", "int"):
        q = ratios(f"w2a2_{residual}_residual_int_conv", f"w2a2_{residual}_residual_float_conv")
        cases[f"{residual}_residual_int_over_float_conv"] = q
        print(f"{residual} residual: integer / float conv step throughput {q[1]:.3f} [{q[0]:.3f}, {q[2]:.3f}]")
    report = {"threads": args.threads, "batch": args.batch, "rounds": args.rounds, "cases": cases,
              "env": environment(dev, 0, "fp32")}  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    from vaqkd.cli import run_script

    raise SystemExit(run_script(main, "benchmarks/int_conv_step.py"))
