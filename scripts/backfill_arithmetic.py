"""Give every committed run record made before the arithmetic fingerprint its reconstructed arithmetic.

    python scripts/backfill_arithmetic.py [results]

A record's env.json (its start and each resume) gets `arithmetic` = the era of that part's git SHA against the
measured boundary (engine.arithmetic.BOUNDARY): `legacy:before-a20de37`, `legacy:a20de37-7894ee1`, or `unknown`
when git does not know the SHA; and `arithmetic_reconstructed: true`. Records that have a fingerprint are left
alone. Reports then pair and average these records only within one era, and never with fingerprinted runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from vaqkd.engine.arithmetic import legacy_era

ROOT = Path(__file__).resolve().parents[1]


def is_ancestor(a: str, b: str) -> bool | None:
    known = subprocess.run(["git", "cat-file", "-e", f"{b}^{{commit}}"], cwd=ROOT, capture_output=True)
    if known.returncode:
        return None
    return subprocess.run(["git", "merge-base", "--is-ancestor", a, b], cwd=ROOT).returncode == 0


def main() -> None:
    top = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "results"
    counts: dict[str, int] = {}
    for env_path in sorted(top.rglob("env.json")):
        env = json.loads(env_path.read_text())
        if "arithmetic" in env:
            continue
        for part in (env, *env.get("resumes", [])):
            part["arithmetic"] = legacy_era(part.get("git_sha", "unknown"), is_ancestor)
            part["arithmetic_reconstructed"] = True
        eras = " + ".join(dict.fromkeys(p["arithmetic"] for p in (env, *env.get("resumes", []))))
        counts[eras] = counts.get(eras, 0) + 1
        env_path.write_text(json.dumps(env, indent=2) + "\n")
    print(json.dumps(counts, indent=2))


if __name__ == "__main__":
    main()
