"""Does the fast path change accuracy? Two paired comparisons on real CIFAR-100 at reduced scale, over seeds.

1. The short teacher preset (configs/cifar100/teacher_resnet32_short.toml) in bf16 and in fp32: top-1,
   seconds per epoch and img/s of each.
2. The W2A2 no-KD row at the `quick` preset: the fast path (bf16 autocast, compiled LSQ kernels, ReLUs
   absorbed by or fused with the quantizers) against the plain path (fp32, eager kernels); the ReLU
   absorption and fusion are exact, so what differs is precision and rounding at the quantizer's edges.

Each pair shares a seed (same initial weights, data order and augmentation); the report gives each path's
mean ± std and the paired difference fast − plain with its 95 % t-interval.

    python benchmarks/fast_vs_plain.py --data-root ../shared/data/cifar100 [--seeds 3] [--teacher pretrained]

Writes results/fast_vs_plain/{report.md,report.json}; the runs live under runs/fast_vs_plain/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from vaqkd.analysis.stats import mean_std, paired_interval
from vaqkd.cli import int_in
from vaqkd.data.build import env_data_root
from vaqkd.presets import config_hash, preset_config
from vaqkd.rundir import has_checkpoint, resolve_weights
from vaqkd.runner import command_line, meta, run_or_reuse

ROOT = Path(__file__).resolve().parents[1]


def _summary(run_dir: Path) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((run_dir / "final.json").read_text())
    return {"top1_last": final["top1_last"], "top1_best": final["top1_best"], "epochs": final["epochs"],
            "train_images": final["train_images"], "precision": final["precision"],
            "seconds_per_epoch": sum(r["epoch_seconds"] for r in rows) / len(rows),
            "img_per_s": final["img_per_s"], "run_dir": str(run_dir),
            "git_sha": json.loads((run_dir / "env.json").read_text()).get("git_sha", "unknown")}  # fmt: skip


def _train_cli(config: str, out: Path, data_root: str, sets: list[str], env: dict) -> None:
    """`vaqkd train` in a child process (so each path gets its own VAQKD_COMPILE), skipped if finished."""
    if (out / "final.json").exists():
        print(f"reuse  {out}")
        return
    resume = ["--resume"] if has_checkpoint(out) else []
    cmd = [sys.executable, "-m", "vaqkd.cli", "train", config, "--preset", "quick", "--out", str(out), "--no-progress",
           "--data-root", data_root, *resume, *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=env_data_root(), required=env_data_root() is None)  # default: $VAQKD_DATA
    ap.add_argument("--teacher", default="pretrained")
    ap.add_argument("--seeds", type=int_in(1), default=3)
    args = ap.parse_args()
    resolve_weights(args.teacher, "resnet32", "--teacher")  # before any training, not after the teacher runs
    if not args.teacher.startswith("pretrained"):  # a path: as given here, whatever folder the children run in
        args.teacher = str(Path(args.teacher).resolve())
    runs = ROOT / "runs/fast_vs_plain"
    out = ROOT / "results/fast_vs_plain"
    out.mkdir(parents=True, exist_ok=True)
    data_root = str(Path(args.data_root).resolve())
    root = [("data.root", data_root)]
    report: dict = {}
    for seed in range(args.seeds):
        for prec in ("bf16", "fp32"):
            sets_ = root + [f"train.precision={prec}", f"train.seed={seed}"]
            cfg = preset_config(ROOT / "configs/cifar100/teacher_resnet32_short.toml", None, sets_)
            run = runs / f"teacher_short_{prec}-s{seed}-{config_hash(cfg)}"
            run_or_reuse(cfg, run, print)
            report[f"teacher_short_{prec}-s{seed}"] = {**_summary(run), "kernels": "—", "seed": seed}
        sets = [f"model.init={json.dumps(args.teacher)}", f"train.seed={seed}"]  # a JSON string is a TOML string
        for name, prec, compile_ in (("w2a2_fast", "bf16", "1"), ("w2a2_plain", "fp32", "0")):
            run = runs / f"{name}-s{seed}"
            _train_cli(
                "configs/cifar100/w2a2_qat.toml",
                run,
                data_root,
                sets + [f"train.precision={prec}"],
                dict(os.environ, VAQKD_COMPILE=compile_),
            )
            report[f"{name}-s{seed}"] = {**_summary(run), "kernels": "compiled" if compile_ == "1" else "eager",
                                         "seed": seed}  # fmt: skip
    lines = [f"# Fast path vs plain path (real CIFAR-100, reduced scale, {args.seeds} seeds)", "",
             f"Command: `{command_line()}`", "",
             "Top-1 on the full CIFAR-100 test split after the stated epochs (reduced scale). s / epoch and img/s are "
             "wall-clock figures of each run and some runs shared the cores with other work; `vaqkd bench` "
             "(results/bench/) gives the clean speed ratios. *git*: the code that trained the run (-dirty: with "
             "uncommitted changes to tracked files outside results/).", "",
             "| run | seed | precision | quantizer kernels | epochs × images | top-1 last | s / epoch | img/s | git |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in report.items():
        lines.append(
            f"| {name.rsplit('-s', 1)[0]} | {r['seed']} | {r['precision']} | {r['kernels']} | "
            f"{r['epochs']} × {r['train_images']} | {r['top1_last']:.2f} | {r['seconds_per_epoch']:.1f} | "
            f"{r['img_per_s']:.0f} | {r['git_sha'][:7]}{'-dirty' if r['git_sha'].endswith('-dirty') else ''} |"
        )
    lines += ["", "| comparison | fast (mean ± std) | plain (mean ± std) | fast − plain, 95 % interval | verdict |",
              "|---|---|---|---|---|"]  # fmt: skip
    summary = {}
    for fast, plain in (("teacher_short_bf16", "teacher_short_fp32"), ("w2a2_fast", "w2a2_plain")):
        a = [report[f"{fast}-s{k}"]["top1_last"] for k in range(args.seeds)]
        b = [report[f"{plain}-s{k}"]["top1_last"] for k in range(args.seeds)]
        d = paired_interval(a, b)
        summary[f"{fast}_vs_{plain}"] = d
        (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
        ci = f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]" if d["lo"] is not None else f"{d['mean']:+.2f}"
        lines.append(f"| {fast} vs {plain} | {ma:.2f} ± {sa:.2f} | {mb:.2f} ± {sb:.2f} | {ci} | {d['verdict']} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    meta_ = meta("quick", args.seeds, list(report), args.teacher)
    (out / "report.json").write_text(json.dumps({"runs": report, "paired": summary, "meta": meta_}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    from vaqkd.cli import run_script

    raise SystemExit(run_script(main, "benchmarks/fast_vs_plain.py"))
