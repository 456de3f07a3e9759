"""The integer residual's training step on its fast path (`quant.residual.IntStage`: each block's end fused with the
next block's stream quantizer) against the same student run block by block, the float-residual W2A2 step and the
FP32 step: one process, cases interleaved round by round, each ratio per round with its quartiles.

    python benchmarks/int_stage.py --threads 2 --rounds 20 --out results/bench/int_stage_amd_zen3.json

ResNet-32, synthetic CIFAR-sized batch, CE only, SGD, fp32 (the precision CPUs without AMX train in); the 2-bit
stream (the conv's own input quantizer carries the shortcut, as `vaqkd bench` times it) and the 8-bit stream (the
deploy artifact's). Run it on a quiet machine: every figure is a median or a per-round ratio of one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from vaqkd import bench
from vaqkd.config import TermConfig
from vaqkd.data.loader import DeviceLoader
from vaqkd.distill.objective import Objective, build_term
from vaqkd.engine.setup import environment, tune_allocator
from vaqkd.engine.step import StudentLoss, train_step
from vaqkd.models import create_model, stage_channels
from vaqkd.quant import calibrate, quantize_student, remove_fusions


def _int_student(bits: int, x: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(0)
    m = quantize_student(create_model("resnet32", 100), 2, 2, residual="int", residual_bits=bits)
    calibrate(m, [x])
    return m.train()


def _step(model, x, y, idx, labels):
    terms = [TermConfig("ce", 1.0)]
    ch = stage_channels(model, [])
    obj = Objective(terms, [build_term(t, ch, ch, labels, 0) for t in terms])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    student, count = StudentLoss(model, obj), [0]

    def fn():
        count[0] += 1
        train_step(student, None, opt, x, y, idx, count[0], "fp32")

    return fn


def _quartiles(v: list[float]) -> list[float]:
    return list(statistics.quantiles(v, n=4)) if len(v) > 1 else [v[0]] * 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    tune_allocator()
    torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4 * args.batch, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(len(images)) % 100
    x, y, idx = next(iter(DeviceLoader(images, labels, args.batch, bench.MEAN, bench.STD, dev, train=True)))

    models = {"fp32": bench._student(None, "lsq", "lsq", x, dev, False),
              "w2a2_float_residual": bench._student(2, "lsq", "lsq", x, dev, False)}  # fmt: skip
    for bits in (2, 8):
        fast = _int_student(bits, x)
        plain = copy.deepcopy(fast)
        remove_fusions(plain)  # the same student, its stages block by block
        models[f"int{bits}_fast"], models[f"int{bits}_block_by_block"] = fast, plain
    steps = {k: _step(m, x, y, idx, labels) for k, m in models.items()}
    for fn in steps.values():
        for _ in range(3):  # compile and warm up
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for k, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    report = {"threads": args.threads, "batch": args.batch, "rounds": args.rounds, "cases": {}, "ratios": {}}
    for k, v in times.items():
        per_round = [a / b for a, b in zip(times["fp32"], v)]  # > 1: faster than the FP32 step
        report["cases"][k] = {"ms_per_step": 1e3 * statistics.median(v), "over_fp32_quartiles": _quartiles(per_round)}
        q1, q2, q3 = _quartiles(per_round)
        print(f"{k:22s} {1e3 * statistics.median(v):7.1f} ms   throughput / FP32 {q2:.3f} [{q1:.3f}, {q3:.3f}]")
    for bits in (2, 8):  # the fast path's own gain: block by block time / fast time, per round
        per_round = [a / b for a, b in zip(times[f"int{bits}_block_by_block"], times[f"int{bits}_fast"])]
        report["ratios"][f"int{bits}_fast_over_block_by_block"] = _quartiles(per_round)
        q1, q2, q3 = _quartiles(per_round)
        print(f"int{bits}: fast path / block by block throughput {q2:.3f} [{q1:.3f}, {q3:.3f}]")
    report["env"] = environment(dev, 0, "fp32")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
