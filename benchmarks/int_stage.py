"""The integer residual's training step on its fast path (`quant.residual.IntStage`: each block's end fused with the
next block's stream quantizer) against the same student run block by block, the float-residual W2A2 step and the
FP32 step: one process, cases interleaved round by round, each ratio per round with its quartiles.

    python benchmarks/int_stage.py --threads 2 --rounds 20 --out results/bench/int_stage_amd_zen3.json

ResNet-32, synthetic CIFAR-sized batch, CE only, SGD, fp32 (the precision CPUs without AMX train in); the 2-bit
stream (the conv's own input quantizer carries the shortcut, as `vaqkd bench` times it) and the 8-bit stream (the
deploy artifact's). Run it on a quiet machine: every figure is a median or a per-round ratio of one run. The timing
harness is `step_floor.py`'s.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_floor import _quartiles, _step, interleave, over_fp32, parse_args, synthetic_batch  # noqa: E402

from vaqkd import bench  # noqa: E402
from vaqkd.engine.setup import environment  # noqa: E402
from vaqkd.models import create_model  # noqa: E402
from vaqkd.quant import calibrate, quantize_student, remove_fusions  # noqa: E402


def _int_student(bits: int, x: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(0)
    m = quantize_student(create_model("resnet32", 100), 2, 2, residual="int", residual_bits=bits)
    calibrate(m, [x])
    return m.train()


def main() -> None:
    args = parse_args(__doc__)
    dev = torch.device("cpu")
    x, y, idx, labels = synthetic_batch(args.batch)
    models = {"fp32": bench._student(None, "lsq", "lsq", x, dev, False),
              "w2a2_float_residual": bench._student(2, "lsq", "lsq", x, dev, False)}  # fmt: skip
    for bits in (2, 8):
        fast = _int_student(bits, x)
        plain = copy.deepcopy(fast)
        remove_fusions(plain)  # the same student, its stages block by block
        models[f"int{bits}_fast"], models[f"int{bits}_block_by_block"] = fast, plain
    times = interleave({k: _step(m, x, y, idx, labels, None) for k, m in models.items()}, args.rounds)
    report = {"threads": args.threads, "batch": args.batch, "rounds": args.rounds, "cases": over_fp32(times),
              "ratios": {}}  # fmt: skip
    for bits in (2, 8):  # the fast path's own gain: block by block time / fast time, per round
        q1, q2, q3 = _quartiles([a / b for a, b in zip(times[f"int{bits}_block_by_block"], times[f"int{bits}_fast"])])
        report["ratios"][f"int{bits}_fast_over_block_by_block"] = [q1, q2, q3]
        print(f"int{bits}: fast path / block by block throughput {q2:.3f} [{q1:.3f}, {q3:.3f}]")
    report["env"] = environment(dev, 0, "fp32")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    from vaqkd.cli import run_script

    raise SystemExit(run_script(main, "benchmarks/int_stage.py"))
