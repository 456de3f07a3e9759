"""The method's two free choices, measured: anchor bit width × the anchor's share of the distillation weight.

Logit setting at the `quick` preset's scale (reduced: 100 images per class, 3 epochs from the shipped
teacher). Every cell keeps QKD's total KD weight 0.9 and gives the anchor a share of it
(FP32 term 0.9·(1 − share), anchor 0.9·share), so each cell is weight-matched to `qkd_logit` of the same
seed; the report gives, per cell, mean ± std over seeds and the paired difference to QKD with its 95 %
t-interval (pairs from different kinds of machine are left out, as in the table's report).

Finished runs are recorded under results/ablation/runs (config, env, metrics, final; no weights), and the
records of the table (results/quick/runs) are read too: the default cell (2 bits, share 0.5) is the
table's `vaqkd_logit` and reuses its seeds. Seeds trained at different times add up.

    python benchmarks/anchor_grid.py --data-root ../shared/data/cifar100 --seeds 3
    python benchmarks/anchor_grid.py --data-root ../shared/data/cifar100 --report-only
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vaqkd.analysis.kinds import pair_kind, run_groups, same_machine
from vaqkd.analysis.stats import mean_std, paired_interval
from vaqkd.cli import int_in, output_folder
from vaqkd.data.build import env_data_root
from vaqkd.presets import config_hash, load_preset, row_config
from vaqkd.records import MAX_SEEDS, save_record
from vaqkd.rundir import read_json
from vaqkd.runner import meta, run_or_reuse

BITS = (2, 4, 8)
SHARES = (0.25, 0.5, 0.75)
KD_WEIGHT = 0.9  # QKD's total distillation weight (configs/cifar100/qkd_logit.toml)


def cell_sets(bits: int, share: float) -> list[str]:
    return [
        f"distill.terms.1.weight={KD_WEIGHT * (1 - share):.6g}",
        f"distill.terms.1.anchor_bits=[{bits}]",
        f"distill.terms.1.anchor_weights=[{KD_WEIGHT * share:.6g}]",
    ]


def find(name: str, places: list[Path]) -> dict | None:
    for p in places:
        if (p / name / "final.json").exists():
            return {**read_json(p / name / "final.json"), "run_dir": str(p / name)}
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=env_data_root(), required=env_data_root() is None)  # default: $VAQKD_DATA
    ap.add_argument("--seeds", type=int_in(1, MAX_SEEDS), default=3,
                    help="train seeds 0..N-1 of every cell that lacks them")  # fmt: skip
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--teacher", default="pretrained")
    ap.add_argument("--report-only", action="store_true", help="train nothing; report the records")
    ap.add_argument("--out", type=output_folder, default="results/ablation")
    args = ap.parse_args()
    preset = load_preset(args.preset)
    runs = Path("runs") / args.preset
    out = Path(args.out)
    records = out / "runs"
    places = [runs, records, Path("results") / args.preset / "runs"]
    sets0 = [("data.root", args.data_root)]

    cells = {"qkd_logit": ("qkd_logit", [])}
    for bits in BITS:
        for share in SHARES:
            cells[f"b{bits}_share{share:g}"] = ("vaqkd_logit", cell_sets(bits, share))

    def name_of(cell: str, seed: int) -> str:
        row, sets = cells[cell]
        return f"{row}-s{seed}-{config_hash(row_config(row, preset, seed, args.teacher, sets0 + sets))}"

    if not args.report_only:
        for seed in range(args.seeds):
            for cell, (row, sets) in cells.items():
                name = name_of(cell, seed)
                if find(name, places):
                    continue
                cfg = row_config(row, preset, seed, args.teacher, sets0 + sets)
                if run_or_reuse(cfg, runs / name, print) is not None:
                    save_record(runs / name, records)

    found = {c: {s: f for s in range(MAX_SEEDS) if (f := find(name_of(c, s), places))} for c in cells}
    base = found["qkd_logit"]
    lines = [
        f"# Anchor bit width × anchor share, logit setting — preset `{args.preset}` (reduced scale)",
        "",
        "Each cell: FP32 KD term weight 0.9·(1 − share), anchor weight 0.9·share (QKD: share 0). Top-1 last "
        "epoch on the 10,000 test images; diff = cell − qkd_logit, same seed, same kind of machine; 95 % "
        "t-interval.",
        "",
        "| bits | share | seeds | top-1 | diff vs QKD (pts) | 95 % interval | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    table = []
    for cell, by_seed in found.items():
        if not by_seed:
            continue
        kinds = run_groups(list(by_seed.values()))  # a cell's mean within one kind of run (the largest)
        m, sd = mean_std([f["top1_last"] for f in kinds[0]])
        acc = f"{m:.2f}" if sd != sd else f"{m:.2f} ± {sd:.2f}"
        if len(kinds) > 1:
            acc += f" (n = {len(kinds[0])}; {len(by_seed) - len(kinds[0])} of other kinds apart)"
        entry = {"cell": cell, "sets": cells[cell][1], "seeds": sorted(by_seed), "top1_mean": m, "top1_std": sd,
                 "top1": {s: f["top1_last"] for s, f in by_seed.items()}}  # fmt: skip
        bits, share = ("—", "0") if cell == "qkd_logit" else (cell[1:].split("_share")[0], cell.split("share")[1])
        if cell == "qkd_logit":
            diff = ("—", "—", "reference")
        else:
            seeds = [s for s in sorted(by_seed) if s in base and same_machine(by_seed[s], base[s])[0]]
            if seeds:  # one interval from pairs of one kind (the largest group), never pooled across kinds
                seeds = [r["seed"] for r in run_groups([pair_kind(by_seed[s], base[s]) for s in seeds])[0]]
            if len(seeds) >= 1:
                stat = paired_interval([by_seed[s]["top1_last"] for s in seeds], [base[s]["top1_last"] for s in seeds])
                entry["paired"] = {**stat, "seeds": seeds}
                ci = f"[{stat['lo']:+.2f}, {stat['hi']:+.2f}]" if stat["lo"] is not None else "—"
                diff = (f"{stat['mean']:+.2f}", ci, stat["verdict"])
            else:
                diff = ("—", "—", "no pair")
        table.append(entry)
        lines.append(f"| {bits} | {share} | {len(by_seed)} | {acc} | {diff[0]} | {diff[1]} | {diff[2]} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.md").write_text("\n".join(lines) + "\n")
    info = meta(args.preset, args.seeds, list(cells), args.teacher)
    (out / "grid.json").write_text(json.dumps({"cells": table, "meta": info}, indent=2, default=str) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    from vaqkd.cli import run_script

    raise SystemExit(run_script(main, "benchmarks/anchor_grid.py"))
