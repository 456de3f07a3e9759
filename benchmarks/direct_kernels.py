"""The W2A2 training step with its fused quantizer kernels called directly (inductor's compiled modules, what
trains) against the same kernels called through `torch.compile` (dynamo's frame evaluation and guards before
every call), both timed in interleaved rounds (the order reversed every other round) against the FP32 step; and
one LSQ call, hot, on 65,536 elements (the smallest the direct route serves) by each route.

    python benchmarks/direct_kernels.py --threads 2 --rounds 40 --out results/bench/direct_kernels_intel_amx.json

Synthetic CIFAR-sized batch, CE only, SGD, fp32, as `step_floor.py`; both routes compile the same kernels (the
step's weights after the timed steps are compared bit for bit). Run it on a quiet machine: every figure is a
ratio or a median of one run, the ratios per round with their quartiles.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_floor import _step, over_fp32, parse_args, synthetic_batch  # noqa: E402

from vaqkd import bench  # noqa: E402
from vaqkd.cli import write_output  # noqa: E402
from vaqkd.engine.setup import environment  # noqa: E402
from vaqkd.quant import ste  # noqa: E402
from vaqkd.quant.compiled import _known, call_kind  # noqa: E402

FUSED = {n: getattr(ste, n) for n in ("lsq_forward", "lsq_backward", "relu_lsq_forward", "relu_lsq_backward")}


def _route(routes: dict, name: str) -> None:
    for k, f in FUSED.items():
        f.fn = routes[name][k]


def interleave(steps: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of each step, `rounds` times, the cases in turn and in reverse turn every other round (after three
    warm-up steps each)."""
    for fn in steps.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(rounds):
        for k in list(steps)[:: 1 if r % 2 == 0 else -1]:
            t0 = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def _hot_us(fn, *args, n: int = 500) -> float:
    for _ in range(20):
        fn(*args)
    t0 = time.perf_counter()
    for _ in range(n):
        fn(*args)
    return 1e6 * (time.perf_counter() - t0) / n


def main() -> None:
    args = parse_args(__doc__)
    dev = torch.device("cpu")
    x, y, idx, labels = synthetic_batch(args.batch)
    torch.manual_seed(0)
    fp32 = bench._student(None, "lsq", "lsq", x, dev, False)
    torch.manual_seed(0)
    direct_model = bench._student(2, "lsq", "lsq", x, dev, False)
    torch.manual_seed(0)
    dynamo_model = bench._student(2, "lsq", "lsq", x, dev, False)
    if any(not torch.equal(a, b) for a, b in zip(direct_model.state_dict().values(),
                                                  dynamo_model.state_dict().values())):  # fmt: skip
        raise SystemExit("direct_kernels: the two students differ before training")

    routes = {"dynamo": {k: torch.compile(f.eager, dynamic=True, options=_known(f.options)) for k, f in FUSED.items()}}
    step_direct = _step(direct_model, x, y, idx, labels, None)
    step_direct()  # builds the direct modules
    if any(f.fn is f.eager for f in FUSED.values()):
        raise SystemExit("direct_kernels: compilation is off or failed here (VAQKD_COMPILE=0, no C++ compiler)")
    if any(not f.fn.modules or None in f.fn.modules.values() for f in FUSED.values()):  # (a model's setup probes
        raise SystemExit("direct_kernels: the step's calls went through dynamo: nothing to compare")  # one image)
    routes["direct"] = {k: f.fn for k, f in FUSED.items()}

    def routed(step, name):
        def fn():
            _route(routes, name)
            step()

        return fn

    step_dynamo = _step(dynamo_model, x, y, idx, labels, None)
    steps = {"fp32": _step(fp32, x, y, idx, labels, None), "w2a2_direct": routed(step_direct, "direct"),
             "w2a2_dynamo": routed(step_dynamo, "dynamo")}  # fmt: skip
    _route(routes, "dynamo")
    step_dynamo()  # the two students have now taken one step each
    times = interleave(steps, args.rounds)
    cases = over_fp32(times)
    ratio = [a / b for a, b in zip(times["w2a2_dynamo"], times["w2a2_direct"])]
    q1, q2, q3 = statistics.quantiles(ratio, n=4)
    print(f"direct over dynamo (throughput, per round): {q2:.3f} [{q1:.3f}, {q3:.3f}]")
    same = all(torch.equal(a, b) for a, b in zip(direct_model.state_dict().values(),
                                                 dynamo_model.state_dict().values()))  # fmt: skip
    print(f"the two students' weights after {args.rounds + 4} steps each: {'identical' if same else 'DIFFERENT'}")

    g = torch.Generator().manual_seed(0)
    shape = (4, 16, 32, 32)  # the step's pattern of sizes: both routes reuse what the step compiled
    t, s, dy = torch.randn(shape, generator=g).relu(), torch.tensor(0.3), torch.randn(shape, generator=g)
    if call_kind((dy, t, s, 0, 3, 0.01, True)) is None:
        raise SystemExit("direct_kernels: the hot call would go through dynamo on the direct route")
    hot = {}
    for name in ("direct", "dynamo"):
        _route(routes, name)
        hot[name] = {"lsq_forward": _hot_us(ste.lsq_forward, t, s, 0, 3),
                     "lsq_backward": _hot_us(ste.lsq_backward, dy, t, s, 0, 3, 0.01, True)}  # fmt: skip
        print(f"{name:7s} hot call on 65,536 elements: forward {hot[name]['lsq_forward']:.1f} µs, backward "
              f"{hot[name]['lsq_backward']:.1f} µs")
    _route(routes, "direct")
    report = {"command": " ".join(["python", "benchmarks/direct_kernels.py", *sys.argv[1:]]),
              "threads": args.threads, "batch": args.batch, "rounds": args.rounds, "cases": cases,
              "direct_over_dynamo_quartiles": [q1, q2, q3], "weights_identical": same, "hot_call_us": hot,
              "env": environment(dev, 0, "fp32")}  # fmt: skip
    if args.out:
        write_output(args.out, report)


if __name__ == "__main__":
    main()
