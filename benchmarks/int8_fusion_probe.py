"""A probe, not a backend: how fast would torch's int8 path run the integer-residual student if a block's end were
the pattern inductor fuses into one oneDNN conv (conv -> add(shortcut) -> ReLU -> quantize, a binary post-op, as
PT2E's int8 teacher gets), i.e. without the block's mid requantization Q_mid between conv2 and the add?

    python benchmarks/int8_fusion_probe.py --student results/deploy/qkd_logit-int8stream-full-s1.vaqkd.safetensors

Both programs are built from the same weights and steps (`vaqkd.deploy.torch_int8`); the probe's differs only in
each block's end: conv2's float output is added to the shortcut directly (no Q_mid) and the 8-bit stream's clamp is
left to quantize's uint8 saturation (the same codes for an 8-bit stream). That is another arithmetic than the trained
model's, so the probe measures what the fusion would buy, for a decision on training without Q_mid; how far the
answers move without retraining is printed too (top-1 of both programs and their agreement on the test images, in
whole batches). Timed interleaved: `--rounds` rounds of `--calls` calls of each program on `--batch` test images,
`--threads` threads, the order of the two programs alternating from round to round; the median of the rounds and
the spread of the per-round ratios. Nothing else may run meanwhile."""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from infer import _cpu_name, _git_sha  # noqa: E402

from vaqkd.cli import int_in, output_file, write_output  # noqa: E402
from vaqkd.data.build import env_data_root  # noqa: E402
from vaqkd.data.cifar import load_split  # noqa: E402
from vaqkd.deploy import torch_int8  # noqa: E402
from vaqkd.deploy.artifact import ExportError  # noqa: E402
from vaqkd.deploy.onnx_export import normalisation, source_model  # noqa: E402


class FusedEnd(torch_int8._Block):
    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """`torch_int8._Block.forward` without Q_mid: conv2 -> + shortcut -> ReLU -> quantize (8-bit stream)."""
        y, sc = self.branch(u)
        out = F.relu(y + sc)
        return out if self.s_out is None else torch_int8._q(out, self.s_out, 0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", required=True, help="an integer-residual run or packed artifact (8-bit stream)")
    ap.add_argument("--data-root", default=env_data_root() or "../shared/data/cifar100", help="CIFAR root")
    ap.add_argument("--batch", type=int_in(1), default=256)
    ap.add_argument("--threads", type=int_in(1), default=2)
    ap.add_argument("--rounds", type=int_in(1), default=5)
    ap.add_argument("--calls", type=int_in(1), default=10)
    ap.add_argument("--out", type=output_file)
    args = ap.parse_args(argv)

    student, (mean, std), meta = source_model(args.student, args.data_root)
    norm = normalisation(mean, std)
    program = torch_int8.Int8Program(student.eval(), *norm).eval()  # checks the model before any compiling
    if any(b.qp_out not in (None, 255) for b in program.blocks):
        raise ExportError(f"--student {args.student}: the probe takes an 8-bit stream (quant.residual_bits = 8)")
    images, labels = load_split(meta.get("dataset", "cifar100"), args.data_root, train=False)
    n = len(images) // args.batch * args.batch
    if n == 0:
        raise ExportError(f"--batch {args.batch}: more than the {len(images)} test images")
    torch.set_num_threads(args.threads)
    example = images[: args.batch].contiguous()
    trained = torch_int8.compile_int8(student, *norm, example=example)
    for b in program.blocks:
        b.__class__ = FusedEnd
    fused = torch_int8._runner(program, example, torch_int8._OPTIONS)
    batches = [images[i : i + args.batch].numpy() for i in range(0, n, args.batch)]
    pred = {k: np.concatenate([run(x).argmax(1) for x in batches])
            for k, run in (("trained", trained), ("fused", fused))}  # fmt: skip
    y = labels[:n].numpy()
    agree = float((pred["trained"] == pred["fused"]).mean())
    top1 = {k: float((p == y).mean() * 100) for k, p in pred.items()}
    x = batches[0]
    cases = {"trained (Q_mid)": trained, "fused block end (no Q_mid)": fused}
    secs = {k: [] for k in cases}
    for r in range(args.rounds):  # interleaved: each round times every case once, in alternating order
        for k, run in (cases.items() if r % 2 == 0 else reversed(cases.items())):
            t = time.perf_counter()
            for _ in range(args.calls):
                run(x)
            secs[k].append((time.perf_counter() - t) / args.calls)
    ratios = [a / b for a, b in zip(secs["trained (Q_mid)"], secs["fused block end (no Q_mid)"])]
    result = {"command": " ".join(["python", "benchmarks/int8_fusion_probe.py", *(argv or sys.argv[1:])]),
              "student": args.student, "batch": args.batch, "threads": args.threads, "rounds": args.rounds,
              "calls": args.calls, "machine": platform.processor() or platform.machine(), "device_name": _cpu_name(),
              "torch": torch.__version__, "git_sha": _git_sha(), "test_images": n, "top1": top1, "agreement": agree,
              "img_per_s": {k: args.batch / statistics.median(v) for k, v in secs.items()},
              "speedup_median": statistics.median(ratios), "speedup_spread": [min(ratios), max(ratios)]}  # fmt: skip
    for k, v in result["img_per_s"].items():
        print(f"{k:28s} {v:8.0f} img/s")
    print(f"fused / trained: x{result['speedup_median']:.2f} [{min(ratios):.2f}, {max(ratios):.2f}] over "
          f"{args.rounds} rounds; on {n} test images top-1 {top1['trained']:.2f} (trained) / {top1['fused']:.2f} % "
          f"(without Q_mid, not retrained), the same answer on {100 * agree:.2f} %")
    if args.out:
        write_output(args.out, result)
    return 0


if __name__ == "__main__":
    from vaqkd.cli import run_script

    raise SystemExit(run_script(main, "benchmarks/int8_fusion_probe.py"))
