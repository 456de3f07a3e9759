"""Figures for the report (matplotlib, PNG)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vaqkd.rundir import read_jsonl  # noqa: E402


def _tick_label(name: str, width: int = 22) -> str:
    """A row name for an axis, wrapped: a row split by machine ("qkd_logit [<arithmetic>, AMD EPYC, AVX2, fp32,
    1 thread]") keeps every field legible instead of running off the figure."""
    row, _, kind = name.partition(" [")
    if not kind:
        return row
    return "\n".join([row, *textwrap.wrap("[" + kind, width, break_on_hyphens=False, break_long_words=False)])


def accuracy_bars(rows: list[dict], path: Path) -> None:
    names = [r["row"] for r in rows]
    labels = [_tick_label(n) for n in names]
    lines = max(label.count("\n") for label in labels) + 1  # one: names only, rotated as they always were
    fig, ax = plt.subplots(figsize=(max(6, (1.5 if lines > 1 else 0.7) * len(rows) + 2), 3.6 + 0.2 * lines))
    means = [r["top1_last_mean"] for r in rows]
    errs = [0 if r["top1_last_std"] != r["top1_last_std"] else r["top1_last_std"] for r in rows]
    colours = ["tab:green" if n.startswith("vaqkd") else "tab:blue" if n.startswith("qkd") else "tab:grey"
               for n in names]  # fmt: skip
    ax.bar(range(len(rows)), means, yerr=errs, capsize=4, color=colours)
    for i, r in enumerate(rows):  # individual seeds as dots
        ax.plot([i] * len(r["top1_last"]), r["top1_last"], "k.", ms=4)
    lo = min(min(r["top1_last"]) for r in rows)
    ax.set_ylim(max(0, lo - 5), max(max(r["top1_last"]) for r in rows) + 2)
    if lines > 1:
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
    else:
        ax.set_xticks(range(len(rows)), labels, rotation=35, ha="right")
    ax.set_ylabel("test top-1 (%), last epoch")
    ax.set_title("mean ± std over seeds (dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _metrics(run_dir: str) -> list[dict]:
    return read_jsonl(Path(run_dir) / "metrics.jsonl", require={"epoch": int})


def training_curves(results: dict[str, list[dict]], path: Path, paper: dict[str, float] | None = None) -> None:
    """Test top-1 and every loss part per epoch, QKD vs VA-QKD, seed 0, per setting; `paper` (row -> top-1)
    draws the paper's final figure of each row as a dotted level beside its curve."""
    settings = [s for s in ("logit", "feature", "contrastive") if f"vaqkd_{s}" in results and f"qkd_{s}" in results]
    if not settings:
        return
    fig, axes = plt.subplots(2, len(settings), figsize=(4.5 * len(settings), 6), squeeze=False)
    for j, s in enumerate(settings):
        for row, style in ((f"qkd_{s}", "--"), (f"vaqkd_{s}", "-")):
            m = _metrics(results[row][0]["run_dir"]) if "run_dir" in results[row][0] else []
            ep = [r["epoch"] for r in m]
            (line,) = axes[0, j].plot(ep, [r.get("test_top1", float("nan")) for r in m], style, marker="o", label=row)
            if paper and row in paper:
                axes[0, j].axhline(paper[row], ls=":", color=line.get_color(), label=f"{row}: paper {paper[row]:.2f}")
            for part in m[0]["parts"] if m else []:
                axes[1, j].plot(ep, [r["parts"][part] for r in m], style, marker=".", label=f"{row}: {part}")
        axes[0, j].set_title(s)
        axes[0, j].set_ylabel("test top-1 (%)")
        axes[1, j].set_ylabel("loss part (unweighted)")
        axes[1, j].set_yscale("log")
        axes[1, j].set_xlabel("epoch")
        axes[0, j].legend(fontsize=7)
        axes[1, j].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
