"""Accuracy against training budget: QKD and VA-QKD (logit) at the quick and the full-data presets.

Reads the committed run records of each preset (results/<preset>/runs; the same lookup as `vaqkd table
--report-only`), and plots top-1 (last epoch) against the images a student saw (epochs x training images), mean
with its 95 % t-interval over seeds, n beside each point; the paired VA-QKD - QKD difference per budget goes
in the table. Runs are averaged only within one kind (training arithmetic and machine, as the reports group
them): one kind is plotted for both rows (the one they share with the most runs), every kind is a line of the
table. Writes results/budget/{budget.png, budget.md, budget.json}. A preset without records is left out and
said so.

    python benchmarks/budget_plot.py --data-root ../shared/data/cifar100
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from vaqkd.analysis.kinds import group_label, run_groups
from vaqkd.analysis.report import paired_rows
from vaqkd.analysis.stats import mean_std, t975
from vaqkd.cli import output_folder
from vaqkd.data.build import env_data_root
from vaqkd.presets import load_preset
from vaqkd.records import MAX_SEEDS
from vaqkd.runner import meta, row_result

ROWS = ("qkd_logit", "vaqkd_logit")
PRESETS = ("quick", "full")


def preset_points(preset: str, by_row: dict[str, list[dict]]) -> list[dict]:
    """One point per row and kind of run (`run_groups`: one arithmetic and machine): runs never average across
    two kinds. One kind is plotted for every row of the preset (`plotted`), so the rows' points beside each other
    are of one kind: the kind the rows share with the most runs (else each row's largest); the others are table
    lines of their own."""
    points = []
    for row, finals in by_row.items():
        for group in run_groups(finals):
            acc = [f["top1_last"] for f in group]
            m, sd = mean_std(acc)
            half = t975(len(acc) - 1) * sd / math.sqrt(len(acc)) if len(acc) > 1 else float("nan")
            points.append({"preset": preset, "row": row, "n": len(acc), "mean": m, "half_ci": half,
                           "images_seen": group[0]["epochs"] * group[0]["train_images"],
                           "seeds": sorted(f["seed"] for f in group), "kind": group_label(group)})  # fmt: skip
    rows = [r for r in by_row if by_row[r]]
    shared = set.intersection(*({p["kind"] for p in points if p["row"] == r} for r in rows)) if rows else set()
    if shared:
        best = max(sorted(shared), key=lambda k: sum(p["n"] for p in points if p["kind"] == k))
        for p in points:
            p["plotted"] = p["kind"] == best
    else:
        for r in rows:
            mine = [p for p in points if p["row"] == r]
            for p in mine:
                p["plotted"] = p is max(mine, key=lambda q: q["n"])
    return points


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=env_data_root(), required=env_data_root() is None)  # default: $VAQKD_DATA
    ap.add_argument("--out", type=output_folder, default="results/budget")
    args = ap.parse_args()
    sets = [("data.root", args.data_root)]
    lines = ["| preset | images seen | row | kind of run | n | top-1 (95 % CI) |", "|---|---|---|---|---|---|"]
    points = []
    pairs, missing = [], []
    for preset in PRESETS:
        p, records = load_preset(preset), Path("results") / preset / "runs"
        found = {}
        for row in ROWS:
            found[row] = {s: f for s in range(MAX_SEEDS)
                          if (f := row_result(row, s, p, "pretrained", sets, Path("runs") / preset, print,
                                              train=False, records=records))}  # fmt: skip
        if not any(found.values()):
            missing.append(preset)
            continue
        for pt in preset_points(preset, {row: list(by_seed.values()) for row, by_seed in found.items()}):
            points.append(pt)
            ci = f"± {pt['half_ci']:.2f}" if pt["half_ci"] == pt["half_ci"] else "(one seed)"
            lines.append(f"| {preset} | {pt['images_seen']:,} | {pt['row']} | {pt['kind']} | {pt['n']} | "
                         f"{pt['mean']:.2f} {ci} |")
        # the report's own pairing (same machine kind; cross-machine pairs counted)
        pairs += [{"preset": preset, **pr} for pr in paired_rows({r: list(found[r].values()) for r in ROWS})]
    doc = ["# Accuracy against training budget — QKD vs VA-QKD, logit setting (reduced scale, CPU)", "", *lines, ""]
    doc += ["| preset | comparison | VA-QKD − QKD (pts) | n | 95 % interval | same-seed pairs from different machines, "
            "left out |", "|---|---|---|---|---|---|"]  # fmt: skip
    for pr in pairs:
        ci = f"[{pr['lo']:+.2f}, {pr['hi']:+.2f}]" if pr["lo"] is not None else f"— ({pr['verdict']})"
        mean = f"{pr['mean']:+.2f}" if pr["mean"] is not None else "—"  # n = 0: no seed pairs
        doc.append(f"| {pr['preset']} | {pr['comparison']} | {mean} | {pr['n']} | {ci} | "
                   f"{pr['cross_machine_pairs_left_out']} |")
    if missing:
        doc += ["", f"No records yet for: {', '.join(missing)}."]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "budget.md").write_text("\n".join(doc) + "\n")
    info = meta("budget", 0, list(ROWS), "pretrained")
    (out / "budget.json").write_text(json.dumps({"points": points, "paired": pairs, "missing": missing,
                                                 "meta": info}, indent=2) + "\n")  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for row, colour in zip(ROWS, ("tab:blue", "tab:orange")):
        pts = sorted((p for p in points if p["row"] == row and p["plotted"]), key=lambda p: p["images_seen"])
        if not pts:
            continue
        xs = [p["images_seen"] * (1.03 if row == "vaqkd_logit" else 1) for p in pts]  # side by side
        ax.errorbar(xs, [p["mean"] for p in pts], yerr=[0 if p["half_ci"] != p["half_ci"] else p["half_ci"]
                    for p in pts], fmt="o-", color=colour, capsize=3, label=row)  # fmt: skip
        for x, p in zip(xs, pts):
            dy = 6 if row == "vaqkd_logit" else -10  # labels of the two rows apart
            ax.annotate(f"n={p['n']}", (x, p["mean"]), textcoords="offset points", xytext=(6, dy), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("training images seen (epochs × images)")
    ax.set_ylabel("top-1 on the 10,000 test images (%)")
    ax.set_title("W2A2 ResNet-32, CIFAR-100 (reduced scale, CPU)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "budget.png", dpi=120)
    print("\n".join(doc))


if __name__ == "__main__":
    from vaqkd.cli import run_script

    raise SystemExit(run_script(main, "benchmarks/budget_plot.py"))
