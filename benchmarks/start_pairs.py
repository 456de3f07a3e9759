"""Pair two presets' records of one row by seed (e.g. the same recipe from two starting weights) and print each
side's mean ± sd and the paired difference with its 95 % t-interval; pairs only runs of one arithmetic and
machine kind (the report's rule): pairs of two kinds are two lines, never one interval.

    python benchmarks/start_pairs.py results/quick_t64 results/quick_t64_s30 --row qkd_logit
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vaqkd.analysis.kinds import group_label, pair_kind, run_groups, same_machine
from vaqkd.analysis.stats import mean_std, paired_interval
from vaqkd.errors import RunFileError
from vaqkd.rundir import NUMBER, read_json


def records(folder: Path, row: str) -> dict[int, dict]:
    """The finished runs of `row` in folder/runs by seed; two records of one seed (two configs of the row in one
    folder) are refused by name: which one pairs must not depend on the folders' order."""
    if not (folder / "runs").is_dir():
        raise RunFileError(f"{folder}: no runs/ folder of records here")
    out: dict[int, dict] = {}
    for final in sorted((folder / "runs").glob(f"{row}-s*/final.json")):
        rec = {**read_json(final, {"top1_last": NUMBER, "seed": int}), "run_dir": str(final.parent)}
        if rec["seed"] in out:
            first = Path(out[rec["seed"]]["run_dir"]).name
            raise RunFileError(f"{folder}: two records of {row} seed {rec['seed']} ({first}, {final.parent.name}); "
                             "keep one config of the row in a folder")  # fmt: skip
        out[rec["seed"]] = rec
    if not out:
        raise RunFileError(f"{folder}/runs: no finished record of --row {row}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--row", default="qkd_logit")
    args = ap.parse_args()
    a, b = records(args.a, args.row), records(args.b, args.row)
    seeds = [s for s in sorted(set(a) & set(b)) if same_machine(a[s], b[s])[0]]
    if not seeds:
        print(f"no pairs: {len(set(a) & set(b))} common seed(s), none of one arithmetic and machine kind")
        return
    left_out = len(set(a) & set(b)) - len(seeds)
    groups = run_groups([pair_kind(a[s], b[s]) for s in seeds])  # one line per kind of pair, largest first
    for g in groups:
        kind = [r["seed"] for r in g]
        if len(groups) > 1:
            print(f"-- pairs of {group_label(g)}:")
        report(args, a, b, kind, left_out)


def report(args, a: dict, b: dict, seeds: list[int], left_out: int) -> None:
    for name, side in ((args.a, a), (args.b, b)):
        m, sd = mean_std([side[s]["top1_last"] for s in seeds])
        spread = f" ± {sd:.2f}" if len(seeds) > 1 else ""  # one seed has no sd
        print(f"{name}: {m:.2f}{spread} % (n = {len(seeds)}; {[side[s]['top1_last'] for s in seeds]})")
    p = paired_interval([a[s]["top1_last"] for s in seeds], [b[s]["top1_last"] for s in seeds])
    if p["lo"] is None:
        print(f"{args.a.name} - {args.b.name}: {p['mean']:+.2f} points from {len(seeds)} pair(s): no interval")
        return
    print(f"{args.a.name} - {args.b.name}: {p['mean']:+.2f} [{p['lo']:+.2f}, {p['hi']:+.2f}] points, sd of the "
          f"differences {p['sd']:.2f}; {p['verdict']}; {left_out} pair(s) of two kinds left out")


if __name__ == "__main__":
    from vaqkd.cli import run_script

    raise SystemExit(run_script(main, "benchmarks/start_pairs.py"))
