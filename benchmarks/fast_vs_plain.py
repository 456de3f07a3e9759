"""Does the fast path change accuracy? Two paired comparisons on real CIFAR-100 at reduced scale.

1. The short teacher preset (configs/cifar100/teacher_resnet32_short.toml) in bf16 and in fp32: top-1,
   seconds per epoch and img/s of each.
2. The W2A2 no-KD row at the `quick` preset: the fast path (bf16 autocast, compiled LSQ kernels, the ReLU
   absorbed by the quantizer) against the plain path (fp32, eager kernels); the ReLU skip is exact, so
   what differs is precision and rounding at the quantizer's edges.

    python benchmarks/fast_vs_plain.py --data-root ../shared/data/cifar100 [--teacher pretrained]

Writes results/fast_vs_plain/{report.md,report.json}; the runs live under runs/fast_vs_plain/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from vaqkd.runner import command_line, config_hash, meta, preset_config, run_or_reuse

ROOT = Path(__file__).resolve().parents[1]


def _summary(run_dir: Path) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((run_dir / "final.json").read_text())
    return {"top1_last": final["top1_last"], "top1_best": final["top1_best"], "epochs": final["epochs"],
            "train_images": final["train_images"], "precision": final["precision"],
            "seconds_per_epoch": sum(r["epoch_seconds"] for r in rows) / len(rows),
            "img_per_s": final["img_per_s"], "run_dir": str(run_dir)}  # fmt: skip


def _train_cli(config: str, out: Path, sets: list[str], env: dict) -> None:
    """`vaqkd train` in a child process (so each path gets its own VAQKD_COMPILE), skipped if finished."""
    if (out / "final.json").exists():
        print(f"reuse  {out}")
        return
    resume = ["--resume"] if (out / "state.pt").exists() else []
    cmd = [sys.executable, "-m", "vaqkd.cli", "train", config, "--preset", "quick", "--out", str(out), "--no-progress",
           *resume, *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--teacher", default="pretrained")
    args = ap.parse_args()
    runs = ROOT / "runs/fast_vs_plain"
    out = ROOT / "results/fast_vs_plain"
    out.mkdir(parents=True, exist_ok=True)
    root = [f'data.root="{Path(args.data_root).resolve()}"']
    report: dict = {}
    for prec in ("bf16", "fp32"):
        cfg = preset_config(
            ROOT / "configs/cifar100/teacher_resnet32_short.toml", None, root + [f"train.precision={prec}"]
        )
        run = runs / f"teacher_short_{prec}-{config_hash(cfg)}"
        run_or_reuse(cfg, run, print)
        report[f"teacher_short_{prec}"] = {**_summary(run), "kernels": "—"}
    sets = root + [f'model.init="{args.teacher}"']
    for name, prec, compile_ in (("w2a2_fast", "bf16", "1"), ("w2a2_plain", "fp32", "0")):
        run = runs / name
        _train_cli(
            "configs/cifar100/w2a2_qat.toml",
            run,
            sets + [f"train.precision={prec}"],
            dict(os.environ, VAQKD_COMPILE=compile_),
        )
        report[name] = {**_summary(run), "kernels": "compiled" if compile_ == "1" else "eager"}
    lines = ["# Fast path vs plain path (real CIFAR-100, reduced scale, 1 seed each)", "",
             f"Command: `{command_line()}`", "",
             "| run | precision | quantizer kernels | epochs × images | top-1 last | top-1 best | s / epoch | img/s |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in report.items():
        lines.append(
            f"| {name} | {r['precision']} | {r['kernels']} | {r['epochs']} × {r['train_images']} | "
            f"{r['top1_last']:.2f} | {r['top1_best']:.2f} | {r['seconds_per_epoch']:.1f} | {r['img_per_s']:.0f} |"
        )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    meta_ = meta("quick", 1, list(report), args.teacher)
    (out / "report.json").write_text(json.dumps({"runs": report, "meta": meta_}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
