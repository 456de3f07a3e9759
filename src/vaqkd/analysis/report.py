"""The report of `vaqkd table`: table.{md,csv,json}, paired differences, figures, and meta.json."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from vaqkd.analysis.kinds import arithmetic_of, group_label, lacks_part_fingerprint, pair_kind, run_groups, same_machine
from vaqkd.analysis.stats import mean_std, paired_interval

SETTINGS = ("logit", "feature", "contrastive", "feature_wrn")

# The paper's table (CIFAR-100, ResNet-32, W2A2, 240 epochs; the teacher FP32): what a row is compared against.
PAPER_TOP1 = {
    "teacher": 70.19,
    "qkd_logit": 64.97, "vaqkd_logit": 65.06,
    "qkd_feature": 64.24, "vaqkd_feature": 64.40,
    "qkd_contrastive": 64.48, "vaqkd_contrastive": 64.64,
}  # fmt: skip


def _fmt(m: float, sd: float) -> str:
    return f"{m:.2f}" if sd != sd else f"{m:.2f} ± {sd:.2f}"  # sd != sd: nan (one seed)


def _no_nan(obj):
    """NaN (a one-seed std) and inf as null: bare NaN is not JSON, and strict readers reject the file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_no_nan(v) for v in obj]
    return obj


def _config_text(final: dict) -> str | None:
    """The resolved config of a row's first run (the others differ in train.seed only)."""
    path = Path(final.get("run_dir", "")) / "config.toml"
    return path.read_text() if final.get("run_dir") and path.exists() else None


def summary_rows(results: dict[str, list[dict]]) -> list[dict]:
    """One line per row and kind of run (`run_groups`): a row whose records come from two machines or two
    arithmetics is two lines, never one average; each line says what it left to the others."""
    rows = []
    for row, all_finals in results.items():
        groups = run_groups(all_finals) if row != "teacher" else [all_finals]
        for finals in groups:
            rows.append(_summary(row if len(groups) == 1 else f"{row} [{group_label(finals)}]", finals,
                                 len(all_finals) - len(finals)))  # fmt: skip
    return rows


def _summary(row: str, finals: list[dict], left_out: int) -> dict:
    last, best = [f["top1_last"] for f in finals], [f["top1_best"] for f in finals]
    prof = finals[0].get("profile") or {}
    ml, sl = mean_std(last)
    mb, sb = mean_std(best)
    return {
        "row": row,
        "bits": f"W{prof.get('w_bits', 2)}A{prof.get('a_bits', 2)}" if prof else "FP32",
        "seeds": len(finals),
        "top1_last_mean": ml, "top1_last_std": sl, "top1_best_mean": mb, "top1_best_std": sb,
        "size_mib_paper": prof.get("paper_quant_mib"), "size_mib_run": prof.get("quant_mib"),
        "bops_reduction_paper": prof.get("paper_bops_reduction"), "bops_reduction_run": prof.get("bops_reduction"),
        "train_seconds_mean": sum(f["train_seconds"] for f in finals) / len(finals),
        "epochs": finals[0]["epochs"], "train_images": finals[0]["train_images"],
        "top1_last": last, "seeds_list": [f["seed"] for f in finals],
        "config": _config_text(finals[0]),
        "fp32_mib": finals[0].get("fp32_mib") or (prof.get("fp32_mib") if prof else None),
        "arithmetic": arithmetic_of(finals[0]), "records_of_other_kinds": left_out,
        "trained_on": group_label(finals) if row.split(" [")[0] != "teacher" else None,
        "runs": [Path(f["run_dir"]).name for f in finals if f.get("run_dir")],
        "paper_top1": PAPER_TOP1.get(row.split(" [")[0]),
    }  # fmt: skip


def _pairs_of(va: list[dict], ref: list[dict]) -> tuple[list[tuple[dict, dict]], int, int]:
    """Pairs of one seed and one kind (`same_machine`): a seed may have records of several kinds on each side (the
    same experiment run on two machines or in two precisions, `records.other_arithmetic`), and each record pairs with
    at most one partner of its own kind. Also returned: how many pairs a seed could have made of the records left
    without a partner of their kind on both sides (at most as many as the smaller side), by reason (arithmetic
    differs / machine differs); a record whose seed has nothing left on the other side is unpaired, like a seed
    only one row has."""
    pairs, cross_arith, cross_machine = [], 0, 0
    for seed in sorted({f["seed"] for f in va} & {f["seed"] for f in ref}):
        free, alone = [r for r in ref if r["seed"] == seed], []
        for v in (f for f in va if f["seed"] == seed):
            partner = next((r for r in free if same_machine(v, r)[0]), None)
            if partner is None:
                alone.append(v)
            else:
                free.remove(partner)
                pairs.append((v, partner))
        for v in alone[: len(free)]:
            if any(arithmetic_of(v) == arithmetic_of(r) != "unknown" for r in free):
                cross_machine += 1
            else:
                cross_arith += 1
    return pairs, cross_arith, cross_machine


def paired_rows(results: dict[str, list[dict]]) -> list[dict]:
    """VA-QKD - QKD per setting over the seeds both rows have. A pair counts only if both runs share one
    arithmetic and one kind of machine (`same_machine`): a difference across either would mix the method's
    effect with the numerics, so such pairs are left out and counted (`cross_arithmetic_pairs_left_out`,
    `cross_machine_pairs_left_out`); pairs where a record lacks a machine field are kept and counted in
    `pairs_with_unknown_machine_fields`. Pairs of two kinds are two lines (`pooled_rows` says what they say
    together). Each line keeps its per-seed differences (`differences`)."""
    out = []
    for setting in SETTINGS:
        va = results.get(f"vaqkd_{setting}", [])
        for base in (f"qkd_{setting}", f"qkd_{setting}_wmatched"):
            ref = results.get(base, [])
            pairs, cross_arith, cross_machine = _pairs_of(va, ref)
            # pairs of one kind only: never two in one interval
            groups = run_groups([{**pair_kind(v, r), "pair": i} for i, (v, r) in enumerate(pairs)])
            if (cross_arith or cross_machine) and not groups:  # common seeds, none pairable: said, not dropped
                out.append({"comparison": f"vaqkd_{setting} - {base}", "n": 0, "mean": None, "lo": None, "hi": None,
                            "verdict": "no pair of one arithmetic and machine kind", "seeds": [], "arithmetic": None,
                            "differences": [], "cross_arithmetic_pairs_left_out": cross_arith,
                            "cross_machine_pairs_left_out": cross_machine, "pairs_of_other_kinds": 0,
                            "pairs_with_unknown_machine_fields": 0, "pairs_lacking_a_part_fingerprint": 0})
            for g in groups:
                mine = sorted((pairs[f["pair"]] for f in g), key=lambda p: p[0]["seed"])
                stat = paired_interval([v["top1_last"] for v, _ in mine], [r["top1_last"] for _, r in mine])
                label = f" [{group_label(g)}]" if len(groups) > 1 else ""
                out.append({"comparison": f"vaqkd_{setting} - {base}{label}", **stat,
                            "seeds": [v["seed"] for v, _ in mine], "arithmetic": arithmetic_of(g[0]),
                            "differences": [v["top1_last"] - r["top1_last"] for v, r in mine],
                            "cross_arithmetic_pairs_left_out": cross_arith,
                            "cross_machine_pairs_left_out": cross_machine,
                            "pairs_of_other_kinds": len(pairs) - len(mine),
                            "pairs_with_unknown_machine_fields": sum(same_machine(v, r)[1] for v, r in mine),
                            "pairs_lacking_a_part_fingerprint": sum(lacks_part_fingerprint(v, r)
                                                                    for v, r in mine)})  # fmt: skip
    return out


def pooled_rows(pairs: list[dict]) -> list[dict]:
    """Where a comparison's pairs come from several kinds (lines `row [kind]` of `paired_rows`), one interval over
    all of them. Each difference is still taken within one arithmetic and machine: no run is compared across kinds
    and no row averages two. What it assumes: that VA-QKD's effect does not depend on the arithmetic, so that the
    kinds only add spread between pairs (were it to, the mean would weigh each kind by its number of pairs, `n_by
    _kind`). A seed counts once (its pair of the largest kind): two pairs of one seed share the seed's batch order
    and random draws, so they are not two independent draws. A line only where two or more kinds remain."""
    out = []
    for name in dict.fromkeys(p["comparison"].split(" [")[0] for p in pairs):
        lines = [p for p in pairs if p["comparison"].split(" [")[0] == name and p["n"]]
        seen, diffs, by_kind = set(), [], {}
        for p in sorted(lines, key=lambda p: -p["n"]):
            for seed, d in zip(p["seeds"], p["differences"]):
                if seed not in seen:
                    seen.add(seed)
                    diffs.append(d)
                    kind = p["comparison"].partition(" [")[2].rstrip("]")
                    by_kind[kind] = by_kind.get(kind, 0) + 1
        if len(by_kind) < 2:
            continue
        stat = paired_interval(diffs, [0.0] * len(diffs))
        out.append({"comparison": f"{name} [pooled over {len(by_kind)} kinds, each pair within one]", **stat,
                    "seeds": sorted(seen), "kinds": len(by_kind), "n_by_kind": by_kind,
                    "same_seed_pairs_left_out": sum(p["n"] for p in lines) - len(diffs)})  # fmt: skip
    return out


def write_report(out_dir: Path, results: dict[str, list[dict]], meta: dict) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, pairs = summary_rows(results), paired_rows(results)
    pooled = pooled_rows(pairs)
    doc = _no_nan({"rows": rows, "paired": pairs, "pooled": pooled, "meta": meta})
    (out_dir / "table.json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    with open(out_dir / "table.csv", "w", newline="") as f:
        keys = [k for k in rows[0] if k not in ("top1_last", "seeds_list", "config", "runs")]
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = [
        f"# vaqkd table — preset `{meta['preset']}`",
        "",
        f"Command: `{meta['command']}`  ",
        f"Report written at git {meta['git_sha']}, torch {meta['torch']}, on {meta['device_name']} ({meta['device']}, "
        f"CPU capability {meta.get('cpu_capability', 'unknown')}); teacher `{meta['teacher']}`. Where each row's "
        "runs trained: its *trained on* column.  ",
        *(
            [f"Runs trained at git {', '.join(f'{k[:12]} ({n})' for k, n in meta['runs_git_sha'].items())}.  "]
            if meta.get("runs_git_sha")
            else []
        ),
        "Top-1 on the CIFAR-100 test split, mean ± sample std over seeds; *last* = final epoch, *best* = best "
        "epoch (optimistic: chosen on the test split). Size at the weights' bit width (MiB); BOPs reduction "
        "vs FP32. *paper* = every layer at the body's bits (the paper's convention), *run* = the policy trained "
        "(first conv and last FC as configured). TAKD's time includes its W8A8 and W4A4 assistants. "
        "The default VA-QKD rows share their QKD row's distillation weight (FP32 term + anchor = QKD's weight), "
        "so VA-QKD − QKD is the weight-matched comparison; `qkd_*_wmatched` rows are the control for anchors "
        "added on top of the FP32 term. A row whose records come from two training arithmetics or machines is "
        "one line per kind, `row [arithmetic, machine]`: runs average only within one. *paper top-1*: the "
        "paper's table (240 epochs; the teacher's row is the paper's teacher), *Δ paper* = top-1 last − paper.",
        "",
        "| row | bits | seeds | top-1 last | top-1 best | paper top-1 | Δ paper | size MiB (paper / run) | "
        "BOPs ↓ (paper / run) | train s / seed | epochs × images | trained on |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fp32 = f"{r['fp32_mib']:.3f} (FP32)" if r.get("fp32_mib") else "FP32"
        size = f"{r['size_mib_paper']:.3f} / {r['size_mib_run']:.3f}" if r["size_mib_run"] else fp32
        bops = f"{r['bops_reduction_paper']:.0f}× / {r['bops_reduction_run']:.1f}×" if r["size_mib_run"] else "1×"
        paper = r.get("paper_top1")
        vs = (f"{paper:.2f} | {r['top1_last_mean'] - paper:+.2f}" if paper is not None and r["bits"] in ("W2A2", "FP32")
              else "— | —")  # fmt: skip
        lines.append(
            f"| {r['row']} | {r['bits']} | {r['seeds']} | {_fmt(r['top1_last_mean'], r['top1_last_std'])} | "
            f"{_fmt(r['top1_best_mean'], r['top1_best_std'])} | {vs} | {size} | {bops} | "
            f"{r['train_seconds_mean']:.0f} | "
            f"{r['epochs']} × {r['train_images']} | {r['trained_on'] or '—'} |"
        )
    if pairs:
        lines += ["", "## Paired differences (top-1 last, same seed), 95 % t-interval", "",
                  "A pair counts only when both runs share one training arithmetic (`arithmetic` in env.json; records "
                  "older than it carry the era of their git SHA, `legacy:*`) and one kind of machine (device, CPU "
                  "capability, precision, threads, processes); other pairs are left out and counted, and pairs of "
                  "two kinds are two lines, never one interval (the pooled section below, if any, says what they "
                  "say together, under its assumption). A machine field or part fingerprint (kernels, "
                  "quantizers) that one record lacks (written before the field existed) does not break a pair; such "
                  "pairs are counted. The integer residual stream's fingerprint is held by integer runs alone: "
                  "an integer run pairs with its float-residual partner.", ""]  # fmt: skip
        lines += ["| comparison | n | mean diff (pts) | 95 % interval | verdict |", "|---|---|---|---|---|"]
        for p in pairs:
            ci = f"[{p['lo']:+.2f}, {p['hi']:+.2f}]" if p["lo"] is not None else "—"
            left = p.get("cross_machine_pairs_left_out", 0)
            unknown = p.get("pairs_with_unknown_machine_fields", 0)
            arith = p.get("cross_arithmetic_pairs_left_out", 0)
            note = f" ({left} cross-machine pair(s) left out)" if left else ""
            note += f" ({arith} cross-arithmetic pair(s) left out)" if arith else ""
            note += f" ({unknown} pair(s) with a record lacking a machine field)" if unknown else ""
            part = p.get("pairs_lacking_a_part_fingerprint", 0)
            note += f" ({part} pair(s) with a record lacking a part fingerprint)" if part else ""
            mean = f"{p['mean']:+.2f}" if p["mean"] is not None else "—"
            lines.append(f"| {p['comparison']} | {p['n']} | {mean} | {ci} | {p['verdict']}{note} |")
    if pooled:
        lines += ["", "## Pooled over kinds, 95 % t-interval", "",
                  "Where a comparison has pairs of several kinds (lines above), one interval over all of them. "
                  "Every difference is still taken within one arithmetic and machine; the interval assumes that "
                  "VA-QKD's effect does not depend on the arithmetic (the kinds then only add spread between "
                  "pairs; were it to, the mean would weigh each kind by its pairs, *n by kind*). A seed counts "
                  "once (its pair of the largest kind).", "",
                  "| comparison | n | n by kind | mean diff (pts) | 95 % interval | verdict |",
                  "|---|---|---|---|---|---|"]
        for p in pooled:
            ci = f"[{p['lo']:+.2f}, {p['hi']:+.2f}]" if p["lo"] is not None else "—"
            left = p["same_seed_pairs_left_out"]
            note = f" ({left} pair(s) of a seed already counted left out)" if left else ""
            kinds = ", ".join(f"{n} ({k.split(',')[0]})" for k, n in p["n_by_kind"].items())
            lines.append(f"| {p['comparison']} | {p['n']} | {kinds} | {p['mean']:+.2f} | {ci} | {p['verdict']}{note} |")
    if meta.get("failed"):
        lines += ["", f"**Failed cells** (not in the table): {', '.join(meta['failed'])}."]
    (out_dir / "table.md").write_text("\n".join(lines) + "\n")
    (out_dir / "meta.json").write_text(json.dumps(_no_nan(meta), indent=2, allow_nan=False) + "\n")
    try:
        from vaqkd.analysis.plots import accuracy_bars, training_curves

        accuracy_bars(rows, out_dir / "accuracy.png")
        training_curves(results, out_dir / "curves.png", PAPER_TOP1)
    except ImportError:  # matplotlib is an optional extra
        pass
