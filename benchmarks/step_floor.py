"""Where the W2A2 training step loses to the FP32 one: the step with its quantizer kernels compiled (what runs),
eager, and with the quantizers taken out (the same QConv2d model computing in FP32: the floor the quantizers
add to), timed in interleaved rounds against the FP32 step; then each fused activation-quantizer kernel's time
inside the step against the same call repeated on its own (its input then sits in cache), and the same call on
16 elements in the step and hot (what a call costs besides its data: Python, guards, wrappers).

    python benchmarks/step_floor.py --threads 2 --rounds 20 --out results/bench/step_floor_amd_zen5.json

Synthetic CIFAR-sized batch, CE only, SGD, fp32; run it on a quiet machine: every figure is a ratio or a
median of one run, the ratios per round with their quartiles.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time

import torch

from vaqkd import bench
from vaqkd.cli import int_in, output_file
from vaqkd.config import TermConfig
from vaqkd.data.loader import DeviceLoader
from vaqkd.distill.objective import Objective, build_term
from vaqkd.engine.setup import environment, tune_allocator
from vaqkd.engine.step import StudentLoss, train_step
from vaqkd.models import stage_channels
from vaqkd.quant import ste
from vaqkd.quant.quantizers import LSQQuantizer

FUSED = (ste.lsq_forward, ste.lsq_backward, ste.relu_lsq_forward, ste.relu_lsq_backward)  # the Fused kernels


def _mode(mode: str) -> None:
    """Switch every LSQ quantizer: "compiled" (as trained), "eager" kernels, or "none" (identity, no ReLU fusion)."""
    for f in FUSED:
        f.fn = f.eager if mode == "eager" else getattr(f, "compiled", f.fn)
    LSQQuantizer.forward = _IDENTITY if mode == "none" else _FORWARD
    LSQQuantizer.relu_quant = _NO_FUSION if mode == "none" else _RELU_QUANT


_FORWARD, _RELU_QUANT = LSQQuantizer.forward, LSQQuantizer.relu_quant


def _IDENTITY(self, x):  # noqa: N802
    return x


def _NO_FUSION(self, a, b=None):  # noqa: N802
    return None


def _step(model, x, y, idx, labels, mode: str | None):
    """One CE training step of `model` on the batch, as a callable (`mode`: the quantizers' `_mode` first, or None
    to leave them as they are)."""
    terms = [TermConfig("ce", 1.0)]
    ch = stage_channels(model, [])
    obj = Objective(terms, [build_term(t, ch, ch, labels, 0) for t in terms])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    student, count = StudentLoss(model, obj), [0]

    def fn():
        if mode:
            _mode(mode)
        count[0] += 1
        train_step(student, None, opt, x, y, idx, count[0], "fp32")

    return fn


def _quartiles(v: list[float]) -> list[float]:
    q1, q2, q3 = statistics.quantiles(v, n=4) if len(v) > 1 else (v[0],) * 3
    return [q1, q2, q3]


def parse_args(doc: str) -> argparse.Namespace:
    """The step benchmarks' options (--threads, --batch, --rounds, --out), the process set up for timing."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--threads", type=int_in(1), default=2)
    ap.add_argument("--batch", type=int_in(1), default=128)
    ap.add_argument("--rounds", type=int_in(1), default=20)
    ap.add_argument("--out", type=output_file)
    args = ap.parse_args()
    tune_allocator()
    torch.set_num_threads(args.threads)
    return args


def synthetic_batch(batch: int):
    """(x, y, idx, labels): one CIFAR-sized training batch of synthetic images, through the project's loader."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4 * batch, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(len(images)) % 100
    x, y, idx = next(iter(DeviceLoader(images, labels, batch, bench.MEAN, bench.STD, torch.device("cpu"), train=True)))
    return x, y, idx, labels


def interleave(steps: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of each step, the cases in turn, `rounds` times (after three warm-up steps each)."""
    for fn in steps.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for k, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def over_fp32(times: dict[str, list[float]]) -> dict:
    """Each case's median ms and its per-round throughput over the "fp32" case's (quartiles), printed and returned."""
    cases = {}
    for k, v in times.items():
        q1, q2, q3 = _quartiles([a / b for a, b in zip(times["fp32"], v)])  # > 1: faster than the FP32 step
        cases[k] = {"ms_per_step": 1e3 * statistics.median(v), "over_fp32_quartiles": [q1, q2, q3]}
        print(f"{k:22s} {1e3 * statistics.median(v):7.1f} ms   throughput / FP32 {q2:.3f} [{q1:.3f}, {q3:.3f}]")
    return cases


def main() -> None:
    args = parse_args(__doc__)
    dev = torch.device("cpu")
    x, y, idx, labels = synthetic_batch(args.batch)

    steps = {"fp32": _step(bench._student(None, "lsq", "lsq", x, dev, False), x, y, idx, labels, "compiled")}
    for mode in ("compiled", "eager", "none"):
        steps[f"w2a2_{mode}"] = _step(bench._student(2, "lsq", "lsq", x, dev, False), x, y, idx, labels, mode)
    steps["w2a2_compiled"]()  # compile the kernels, then keep them aside for the "compiled" mode
    for f in FUSED:
        f.compiled = f.fn
    times = interleave(steps, args.rounds)
    report = {"threads": args.threads, "batch": args.batch, "rounds": args.rounds, "cases": over_fp32(times)}

    # each fused kernel inside the compiled step vs the same call repeated on its own
    _mode("compiled")
    calls, args_of = collections.defaultdict(list), {}

    def timed(name, kernel):
        def call(*a):
            t0 = time.perf_counter()
            out = kernel(*a)
            t1 = time.perf_counter()
            # the same kernel on 16 elements right after (what a call costs besides its data), then again (hot)
            tiny = [t[:1, :1, :1, :16].contiguous() if isinstance(t, torch.Tensor) and t.ndim == 4 else t for t in a]
            kernel(*tiny)
            t2 = time.perf_counter()
            kernel(*tiny)
            t3 = time.perf_counter()
            key = f"{name} {tuple(a[1 if 'backward' in name else 0].shape)}"
            calls[key].append((t1 - t0, t2 - t1, t3 - t2))
            args_of[key] = (kernel, a)
            return out

        return call

    names = ("lsq_forward", "lsq_backward", "relu_lsq_forward", "relu_lsq_backward")
    kernels = {n: getattr(ste, n) for n in names}
    for n in names:
        setattr(ste, n, timed(n, kernels[n]))
    try:
        for _ in range(5):
            steps["w2a2_compiled"]()
    finally:
        for n in names:
            setattr(ste, n, kernels[n])
    report["kernels_us"] = {}
    for key in sorted(calls):
        kernel, a = args_of[key]
        alone = []
        with torch.no_grad():  # as inside an autograd Function (the compiled graph is guarded on grad mode)
            for _ in range(20):
                t0 = time.perf_counter()
                kernel(*a)
                alone.append(time.perf_counter() - t0)
        in_step, tiny, tiny_hot = (1e6 * statistics.median(c[i] for c in calls[key]) for i in range(3))
        own = 1e6 * statistics.median(alone)
        report["kernels_us"][key] = {"in_step": in_step, "alone": own, "tiny_in_step": tiny, "tiny_hot": tiny_hot,
                                     "calls_per_step": len(calls[key]) // 5}  # fmt: skip
        print(
            f"{key:36s} {in_step:5.0f} us in the step, {own:5.0f} alone; on 16 elements {tiny:4.0f} in the step, "
            f"{tiny_hot:3.0f} hot ({len(calls[key]) // 5} a step)"
        )
    report["env"] = environment(dev, 0, "fp32")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    from vaqkd.cli import run_script

    raise SystemExit(run_script(main, "benchmarks/step_floor.py"))
