"""How much of a checkpoint's test top-1 is lost to stale BatchNorm running statistics: each run's latest
checkpoint evaluated as saved (the running statistics training left) and again after the statistics are
re-estimated on training batches (`vaqkd.engine.step.reestimate_bn`: a plain average, the model otherwise
unchanged, no gradient; what `vaqkd eval RUN --bn-reestimate N` and the `train.bn_reestimate_batches` knob do).

    python benchmarks/bn_restat.py RUN [RUN ...] --data-root ../shared/data/cifar100 --out results/x.json

A RUN is a run directory (config.toml and a ckpt-<step>/ folder), finished or not. The re-estimation uses the
training loader of the run's own config (its augmentation, epoch 0's order), `--batches` batches of it. The
training-time figure of the same checkpoint (metrics.jsonl, the epoch that ended at that step) is printed
beside, when there is one: it must equal the "as saved" figure (same weights, same evaluation).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from vaqkd.analysis.stats import paired_interval
from vaqkd.cli import int_in, output_file
from vaqkd.data.build import env_data_root
from vaqkd.engine.setup import environment, resolve_precision
from vaqkd.engine.step import evaluate, reestimate_bn
from vaqkd.rundir import latest_checkpoint, load_run, read_jsonl, run_config, run_weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--data-root", default=env_data_root() or "../shared/data/cifar100")
    ap.add_argument("--batches", type=int_in(1), default=50, help="training batches for the re-estimation")
    ap.add_argument("--precision", choices=["fp32", "bf16"], help="default: each run's own (as its training evaluated)")
    ap.add_argument("--layers", action="store_true",
                    help="also each BatchNorm's drift: mean |saved - re-estimated mean| / re-estimated std over its "
                    "channels, and the mean ratio of the variances")  # fmt: skip
    ap.add_argument("--out", type=output_file)
    args = ap.parse_args()
    for run in args.runs:  # every run checked before the first is evaluated: a bad last one loses nothing
        run_config(run)
        run_weights(run)
    dev = torch.device("cpu")
    rows = []
    for run in args.runs:
        cfg, model, data = load_run(run, dev, data_root=args.data_root)
        step = int(latest_checkpoint(run).name.split("-")[1])
        epoch_len = len(data.train)
        metrics = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
        at_step = [r.get("test_top1") for r in metrics if step % epoch_len == 0 and r["epoch"] == step // epoch_len]
        recorded = at_step[-1] if at_step else None  # the evaluation training made of this checkpoint, if any
        precision = resolve_precision(args.precision or cfg.train.precision, dev)
        saved = evaluate(model, data.test, precision)["top1"]
        bns = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
        before = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in bns.items()}
        n_bn = reestimate_bn(model, data.train, args.batches, 0, precision)
        restat = evaluate(model, data.test, precision)["top1"]
        drift = {}
        for n, m in bns.items():
            shift = (before[n][0] - m.running_mean).abs() / (m.running_var + m.eps).sqrt()  # as BN normalises
            ratio = (before[n][1] + m.eps) / (m.running_var + m.eps)
            drift[n] = {"mean_shift_over_std": float(shift.mean()), "var_ratio": float(ratio.mean())}
        rows.append({"run": str(run), "name": cfg.name, "step": step, "epoch": step / epoch_len,
                     "test_top1_recorded": recorded, "test_top1_saved": saved, "test_top1_bn_reestimated": restat,
                     "precision": precision,
                     "bn_layers": n_bn, **({"bn_drift": drift} if args.layers else {})})  # fmt: skip
        print(f"{cfg.name:28s} step {step:6d} (epoch {step / epoch_len:5.2f}): recorded {recorded}, as saved "
              f"{saved:.2f} %, BN re-estimated on {args.batches} batches {restat:.2f} % ({restat - saved:+.2f})")
        if args.layers:
            for n, d in drift.items():
                print(f"  {n:20s} mean shift {d['mean_shift_over_std']:.3f} std, variance ratio {d['var_ratio']:.3f}")
    gain = paired_interval([r["test_top1_bn_reestimated"] for r in rows], [r["test_top1_saved"] for r in rows])
    ci = f" [{gain['lo']:+.2f}, {gain['hi']:+.2f}]" if gain["lo"] is not None else ""
    print(f"gain over the {gain['n']} checkpoint(s): {gain['mean']:+.2f}{ci} points ({gain['verdict']})")
    if args.out:
        command = " ".join(["python", "benchmarks/bn_restat.py", *sys.argv[1:]])
        out = {"gain": gain, "command": command, "batches": args.batches, "rows": rows,
               "env": environment(dev, 0, rows[-1]["precision"])}  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    from vaqkd.cli import run_script

    raise SystemExit(run_script(main, "benchmarks/bn_restat.py"))
