"""The command line's argument types and shared options (also for the scripts under benchmarks/ and scripts/): a
bad value is argparse's one-line error, raised when the arguments are read, before any work."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from vaqkd.errors import VaqkdError, file_in_the_way


def fraction(positive: bool):
    """argparse type: a finite float > 0 (positive) or >= 0; anything else is argparse's one-line error."""

    def parse(text: str) -> float:
        v = float(text)  # not a number: argparse says "invalid ... value"
        if not (math.isfinite(v) and (v > 0 if positive else v >= 0)):
            raise argparse.ArgumentTypeError(f"must be {'> 0' if positive else '>= 0'}, got {text}")
        return v

    return parse


def int_in(lo: int, hi: int | None = None, also: tuple[int, ...] = ()):
    """argparse type: an int in [lo, hi] (or one of `also`); anything else is argparse's one-line error."""

    def parse(text: str) -> int:
        v = int(text)  # not an int: argparse says "invalid int value"
        if not ((lo <= v and (hi is None or v <= hi)) or v in also):
            span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"must be {span}" + "".join(f" or {a}" for a in also) + f", got {v}")
        return v

    parse.__name__ = "int"
    return parse


def output_file(text: str) -> Path:
    """argparse type: a path that can become a file (an existing one is replaced: scripts regenerate their
    results), checked when the arguments are read, not after the work (`rundir.check_file_target`)."""
    from vaqkd.rundir import check_file_target

    try:
        check_file_target(Path(text), "result.json")
    except VaqkdError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return Path(text)


def write_output(path: Path, result: dict) -> None:
    """Write a script's `--out` result (an `output_file` argument) as indented JSON, its folder made, the file
    replaced whole (`rundir.write_json`), and say where."""
    from vaqkd.rundir.files import write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    print(f"wrote {path}")


def output_folder(text: str) -> Path:
    """argparse type: a path that is, or can become, a folder (not a file, not below one)."""
    if (blocker := file_in_the_way(text)) is not None:
        raise argparse.ArgumentTypeError(f"{text}: {blocker} is a file, not a folder")
    return Path(text)


def add_data_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", help="folder holding the datasets (default: $VAQKD_DATA, else ./data)")


def overrides(args) -> list:
    """The command's `--set` overrides (TOML text) and `--data-root` (a path, passed as it is)."""
    out: list = list(args.set or [])
    if getattr(args, "data_root", None):
        out.append(("data.root", args.data_root))
    return out
