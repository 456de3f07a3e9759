"""Which virtual anchors? A measured ablation of the anchor bit widths in the logit setting.

Variants of `vaqkd_logit` at the `quick` preset's scale (reduced: 100 images per class, 3 epochs), next to
QKD and the weight-matched control: one anchor at 8, 4, 3 or 2 bits and two anchors {4, 2}, each adding
anchor weight 0.9 to the FP32 KD weight 0.9; and two weight-preserving variants (`_split`) where FP32 term
and anchor share QKD's 0.9. Writes results/ablation/anchors.{md,json}.

    python benchmarks/ablation_anchors.py --data-root ../shared/data/cifar100 --seeds 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vaqkd.analysis.stats import mean_std
from vaqkd.cli import int_in, output_folder
from vaqkd.data.build import env_data_root
from vaqkd.presets import config_hash, load_preset, row_config
from vaqkd.runner import meta, run_or_reuse

VARIANTS = {
    "qkd_logit": ("qkd_logit", []),
    "qkd_logit_wmatched": ("qkd_logit_wmatched", []),
    "va8": (
        "vaqkd_logit",
        ["distill.terms.1.weight=0.9", "distill.terms.1.anchor_bits=[8]", "distill.terms.1.anchor_weights=[0.9]"],
    ),
    "va4": (
        "vaqkd_logit",
        ["distill.terms.1.weight=0.9", "distill.terms.1.anchor_bits=[4]", "distill.terms.1.anchor_weights=[0.9]"],
    ),
    "va3": (
        "vaqkd_logit",
        ["distill.terms.1.weight=0.9", "distill.terms.1.anchor_bits=[3]", "distill.terms.1.anchor_weights=[0.9]"],
    ),
    "va2": (
        "vaqkd_logit",
        ["distill.terms.1.weight=0.9", "distill.terms.1.anchor_bits=[2]", "distill.terms.1.anchor_weights=[0.9]"],
    ),
    "va4+2": (
        "vaqkd_logit",
        [
            "distill.terms.1.weight=0.9",
            "distill.terms.1.anchor_bits=[4, 2]",
            "distill.terms.1.anchor_weights=[0.45, 0.45]",
        ],
    ),
    # weight-preserving: the anchors take part of the FP32 term's weight, total KD weight stays 0.9 as in QKD
    "va2_split": (
        "vaqkd_logit",
        ["distill.terms.1.weight=0.45", "distill.terms.1.anchor_bits=[2]", "distill.terms.1.anchor_weights=[0.45]"],
    ),
    "va4_split": (
        "vaqkd_logit",
        ["distill.terms.1.weight=0.45", "distill.terms.1.anchor_bits=[4]", "distill.terms.1.anchor_weights=[0.45]"],
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=env_data_root(), required=env_data_root() is None)  # default: $VAQKD_DATA
    ap.add_argument("--seeds", type=int_in(1), default=1)
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--teacher", default="pretrained")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--out", type=output_folder, default="results/ablation")
    args = ap.parse_args()
    preset = load_preset(args.preset)
    runs = Path("runs") / args.preset
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict[str, list[dict]] = {}
    for seed in range(args.seeds):
        for name in args.variants:
            row, sets = VARIANTS[name]
            cfg = row_config(row, preset, seed, args.teacher, [("data.root", args.data_root), *sets])
            final = run_or_reuse(cfg, runs / f"{row}-s{seed}-{config_hash(cfg)}", print)
            res.setdefault(name, []).append(
                {
                    "seed": seed,
                    "top1_last": final["top1_last"],
                    "top1_best": final["top1_best"],
                    "train_seconds": final["train_seconds"],
                }
            )
    lines = [f"# Anchor ablation, logit setting — preset `{args.preset}` (reduced scale), {args.seeds} seed(s)", ""]
    lines += ["| variant | settings | seeds | top-1 last | top-1 best | train s |", "|" + "---|" * 6]
    for name, rows in res.items():
        last, best = mean_std([r["top1_last"] for r in rows]), mean_std([r["top1_best"] for r in rows])
        sets = VARIANTS[name][1]
        anchors = " ".join(s.removeprefix("distill.terms.1.") for s in sets) if sets else "—"
        fmt = lambda m: f"{m[0]:.2f}" if m[1] != m[1] else f"{m[0]:.2f} ± {m[1]:.2f}"  # noqa: E731
        secs = sum(r["train_seconds"] for r in rows) / len(rows)
        lines.append(f"| {name} | {anchors} | {len(rows)} | {fmt(last)} | {fmt(best)} | {secs:.0f} |")
    (out / "anchors.md").write_text("\n".join(lines) + "\n")
    (out / "anchors.json").write_text(
        json.dumps({"results": res, "meta": meta(args.preset, args.seeds, list(res), args.teacher)}, indent=2) + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    from vaqkd.cli import run_script

    raise SystemExit(run_script(main, "benchmarks/ablation_anchors.py"))
