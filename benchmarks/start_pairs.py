"""Pair two presets' records of one row by seed (e.g. the same recipe from two starting weights) and print each
side's mean ± sd and the paired difference with its 95 % t-interval; pairs only runs of one arithmetic and
machine kind (the report's rule): pairs of two kinds are two lines (one interval over them only with `--pool`).

    python benchmarks/start_pairs.py results/quick_t64 results/quick_t64_s30 --row qkd_logit

`--also A2 B2` adds the pairs of two more folders (e.g. more seeds of the same comparison trained on another
machine, kept apart from the first folders' records); a seed counts once: one common to two pairs of folders is
refused, whatever its kinds. `--pool`: with pairs of several kinds,
one interval over all of them besides each kind's line, each difference still taken within one kind (the report's
pooled line, under its assumption that the effect does not depend on the arithmetic). `--across-arithmetic`: where
the arithmetic itself is what the two folders compare (e.g. the integer forward convolution against the float32 one,
`VAQKD_INT_CONV=0`), pair runs whose machine fields agree whatever their fingerprints (device, CPU capability,
precision, threads, processes).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vaqkd.analysis.kinds import MACHINE_FIELDS, group_label, machine_kind, pair_kind, run_groups, same_machine
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


def same_hardware(a: dict, b: dict) -> bool:
    """Every machine field but the arithmetic fingerprints is equal in both records (the device known)."""
    ka, kb = machine_kind(a), machine_kind(b)
    fields = [(f, x, y) for f, x, y in zip(MACHINE_FIELDS, ka, kb) if not f.startswith("arithmetic")]
    return ka[0] is not None and all(x == y for _, x, y in fields)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--row", default="qkd_logit")
    ap.add_argument("--also", nargs=2, type=Path, action="append", default=[], metavar=("A2", "B2"))
    ap.add_argument("--pool", action="store_true", help="also one interval over the pairs of every kind")
    ap.add_argument("--across-arithmetic", action="store_true",
                    help="pair runs of one machine kind whatever their arithmetic fingerprints")  # fmt: skip
    args = ap.parse_args()
    a, b, origin, left_out = {}, {}, {}, 0
    for fa, fb in [(args.a, args.b), *args.also]:
        ra, rb = records(fa, args.row), records(fb, args.row)
        for s in sorted(set(ra) & set(rb)):
            if s in origin:
                raise RunFileError(f"{fa}, {fb}: seed {s} is common to {origin[s][0]}, {origin[s][1]} too; a seed "
                                   "counts once")  # fmt: skip
            origin[s] = (fa, fb)
            if (same_hardware(ra[s], rb[s]) if args.across_arithmetic else same_machine(ra[s], rb[s])[0]):
                a[s], b[s] = ra[s], rb[s]
            else:
                left_out += 1
    seeds = sorted(a)
    if not seeds:
        print(f"no pairs: {left_out} common seed(s), none of one arithmetic and machine kind")
        return
    groups = run_groups([pair_kind(a[s], b[s]) for s in seeds])  # one line per kind of pair, largest first
    for g in groups:
        kind = [r["seed"] for r in g]
        if len(groups) > 1:
            print(f"-- pairs of {group_label(g)}:")
        report(a, b, kind, origin, left_out)
    if args.pool and len(groups) > 1:
        print(f"-- pooled over {len(groups)} kinds (each difference within one):")
        report(a, b, seeds, origin, left_out)


def report(a: dict, b: dict, seeds: list[int], origin: dict, left_out: int) -> None:
    """Each side's mean ± sd over `seeds` and the paired difference; a side is named by its folders."""
    names = ["+".join(dict.fromkeys(str(origin[s][i].name) for s in seeds)) for i in (0, 1)]
    for name, side in zip(names, (a, b)):
        m, sd = mean_std([side[s]["top1_last"] for s in seeds])
        spread = f" ± {sd:.2f}" if len(seeds) > 1 else ""  # one seed has no sd
        print(f"{name}: {m:.2f}{spread} % (n = {len(seeds)}; {[side[s]['top1_last'] for s in seeds]})")
    p = paired_interval([a[s]["top1_last"] for s in seeds], [b[s]["top1_last"] for s in seeds])
    if p["lo"] is None:
        print(f"{names[0]} - {names[1]}: {p['mean']:+.2f} points from {len(seeds)} pair(s): no interval")
        return
    print(f"{names[0]} - {names[1]}: {p['mean']:+.2f} [{p['lo']:+.2f}, {p['hi']:+.2f}] points, sd of the "
          f"differences {p['sd']:.2f}; {p['verdict']}; {left_out} pair(s) of two kinds left out")


if __name__ == "__main__":
    from vaqkd.cli import run_script

    raise SystemExit(run_script(main, "benchmarks/start_pairs.py"))
