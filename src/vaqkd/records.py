"""Run records: what a finished run leaves to be committed (config, env, metrics, final), and how a report finds
them — by the run name a row's config gives (`presets.config_hash`), in run directories or committed records, and
beside them the same experiment trained on other arithmetic.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from vaqkd.config import ARITHMETIC_SETTINGS, Override, load_dict
from vaqkd.errors import VaqkdError
from vaqkd.presets import config_hash, row_config
from vaqkd.rundir import NUMBER, read_json

# what the report reads of a record (final.json) and of a kept teacher evaluation: checked when read, so a damaged
# one is a line naming it and the key, not a traceback from the report
RECORD_FIELDS = {"top1_last": NUMBER, "top1_best": NUMBER, "epochs": int, "train_images": int,
                 "train_seconds": NUMBER, "seed": int}  # fmt: skip

MAX_SEEDS = 100  # the report looks for finished runs of seeds 0..MAX_SEEDS-1
RECORD_FILES = ("config.toml", "env.json", "metrics.jsonl", "final.json")


def save_record(run_dir: Path, records: Path, name: str | None = None) -> Path:
    """Copy a finished run's record (config, env, metrics, final; no weights) to records/<run name>, to be
    committed: a report reads every committed record, so runs made at different times and places add up."""
    dest = records / (name or run_dir.name)
    if (dest / "final.json").exists():
        return dest
    tmp = records / f".{dest.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in RECORD_FILES:
        if (run_dir / f).exists():
            shutil.copy2(run_dir / f, tmp / f)
    tmp.rename(dest)
    return dest


def record_place(name: str, runs: Path, records: Path | None) -> Path | None:
    """Where the finished run `name` can be read: its run directory, else its committed record."""
    for place in (runs / name, records / name if records else None):
        if place is not None and (place / "final.json").exists():
            return place
    return None


def other_arithmetic(row: str, p: dict, teacher: str, overrides: Sequence[Override], runs: Path,
                     records: Path | None, known: set[str]) -> list[dict]:  # fmt: skip
    """Finished runs of `row` (any seed) whose config differs from the row's only in how it computes
    (`config.ARITHMETIC_SETTINGS`: device, precision, threads, memory format) — e.g. a pair trained in bf16
    where the preset says fp32: the same experiment on other arithmetic, which the report shows on lines of its own
    (`analysis.kinds.run_groups`) and pairs only within one kind. A folder counts only if its name is the run name the
    row's config with the folder's own arithmetic settings gives (`config_hash`: every other key, and a class
    folder's content, as the row's). `known`: run names already reported. TAKD chains are matched by their exact
    names only."""
    if row == "takd":
        return []
    out = []
    for place in (runs, records):
        if place is None or not place.is_dir():
            continue
        for d in sorted(place.glob(f"{row}-s*-*")):
            if d.name in known or not (d / "final.json").exists() or not (d / "config.toml").exists():
                continue
            try:
                t = load_dict(d / "config.toml")
                seed = int(t["train"]["seed"])
                sets = [(f"{section}.{k}", t[section][k]) for section, keys in ARITHMETIC_SETTINGS.items()
                        for k in keys if k in t.get(section, {})]  # fmt: skip
                name = f"{row}-s{seed}-{config_hash(row_config(row, p, seed, teacher, [*overrides, *sets]))}"
            except (OSError, KeyError, TypeError, ValueError, VaqkdError):
                continue  # not a record of this row that `table` wrote
            if d.name == name:
                known.add(d.name)
                out.append({**read_json(d / "final.json", RECORD_FIELDS), "run_dir": str(d)})
    return out


def trained_at(results: dict[str, list[dict]]) -> dict[str, int]:
    """How many of the reported runs each git SHA trained (a reused run keeps the SHA that trained it, which
    may be older than the report's)."""
    shas: dict[str, int] = {}
    for entries in results.values():
        for e in entries:
            dirs = [st["run_dir"] for st in e.get("stages", [])] or ([e["run_dir"]] if "run_dir" in e else [])
            for d in dirs:
                env = Path(d) / "env.json"
                sha = read_json(env).get("git_sha", "unknown") if env.exists() else "unknown"
                shas[sha] = shas.get(sha, 0) + 1
    return shas
