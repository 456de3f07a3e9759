"""Give every committed run record made before the arithmetic fingerprint its reconstructed arithmetic.

    python scripts/backfill_arithmetic.py [results]

A record's env.json (its start and each resume) gets `arithmetic` = the era of that part's git SHA against the
measured boundary (engine.arithmetic.BOUNDARY): `legacy:before-a20de37`, `legacy:a20de37-7894ee1`, or `unknown`
when git does not know the SHA; and `arithmetic_reconstructed: true`. Records that have a fingerprint are left
alone. Reports then pair and average these records only within one era, and never with fingerprinted runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from vaqkd.engine.arithmetic import legacy_era
from vaqkd.errors import RunFileError
from vaqkd.rundir import read_json, write_json

ROOT = Path(__file__).resolve().parents[1]


def is_ancestor(a: str, b: str) -> bool | None:
    known = subprocess.run(["git", "cat-file", "-e", f"{b}^{{commit}}"], cwd=ROOT, capture_output=True)
    if known.returncode:
        return None
    return subprocess.run(["git", "merge-base", "--is-ancestor", a, b], cwd=ROOT).returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", type=Path, default=ROOT / "results", help="searched for env.json files")
    top = ap.parse_args().folder
    if not top.is_dir():
        raise RunFileError(f"{top}: no such folder")
    counts: dict[str, int] = {}
    for env_path in sorted(top.rglob("env.json")):
        env = read_json(env_path)
        if "arithmetic" in env:
            continue
        for part in (env, *env.get("resumes", [])):
            part["arithmetic"] = legacy_era(part.get("git_sha", "unknown"), is_ancestor)
            part["arithmetic_reconstructed"] = True
        eras = " + ".join(dict.fromkeys(p["arithmetic"] for p in (env, *env.get("resumes", []))))
        counts[eras] = counts.get(eras, 0) + 1
        write_json(env_path, env)  # whole or not at all
    print(json.dumps(counts, indent=2))


if __name__ == "__main__":
    from vaqkd.cli import run_script

    raise SystemExit(run_script(main, "scripts/backfill_arithmetic.py"))
