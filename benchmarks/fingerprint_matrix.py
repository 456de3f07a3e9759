"""Every training-arithmetic fingerprint of this checkout on this machine — the tiny step, the fused LSQ / PACT /
EWGS kernels (and LSQ channels-last), the integer residual, the EWGS quantizers — in fp32 and bf16, at one and two
threads, each in a fresh process (so that no case sees kernels another compiled); with `--against SRC`, the same for
another checkout's `src/` beside it, case by case: a change that claims to move no arithmetic must read "same" on
every line.

    python benchmarks/fingerprint_matrix.py --against /path/to/other-checkout/src \
        --out results/bench/fingerprint_matrix_intel_amx.json

Takes ~10 s a case and process (28 cases a checkout); run it where nothing else trains if the time matters (the
fingerprints do not depend on the load).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

from vaqkd.cli import output_file, write_output
from vaqkd.engine.setup import environment

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "tiny": "A.fingerprint(cpu, p)",
    "kernels lsq": "A.kernels_fingerprint(cpu, p, 'lsq')",
    "kernels lsq channels-last": "A.kernels_fingerprint(cpu, p, 'lsq', True)",
    "kernels pact": "A.kernels_fingerprint(cpu, p, 'pact')",
    "kernels ewgs": "A.kernels_fingerprint(cpu, p, 'ewgs')",
    "residual": "A.residual_fingerprint(cpu, p)",
    "quantizers ewgs/ewgs": "A.quantizers_fingerprint(cpu, p, 'ewgs', 'ewgs')",
}


def fingerprint(src: Path, case: str, precision: str, threads: int) -> str:
    code = ("import torch; from vaqkd.engine import arithmetic as A; torch.set_num_threads("
            f"{threads}); cpu, p = torch.device('cpu'), {precision!r}; print({CASES[case]})")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if out.returncode:
        last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"
        raise SystemExit(f"fingerprint_matrix: {case} {precision} {threads} thread(s) failed with {src}: {last}")
    return out.stdout.strip().splitlines()[-1]


def git_sha(src: Path) -> str:
    out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", type=Path, help="another checkout's src/ to compare with")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", type=output_file)
    args = ap.parse_args()
    if args.against is not None and not (args.against / "vaqkd" / "engine" / "arithmetic.py").is_file():
        raise SystemExit(f"fingerprint_matrix: --against {args.against}: not a src/ folder with vaqkd's fingerprints")
    sources = {"this": ROOT / "src"} | ({"against": args.against} if args.against else {})
    rows, differ = [], 0
    for threads in args.threads:
        for precision in ("fp32", "bf16"):
            for case in CASES:
                row = {"case": case, "precision": precision, "threads": threads}
                row |= {k: fingerprint(src, case, precision, threads) for k, src in sources.items()}
                same = "" if args.against is None else ("same" if row["this"] == row["against"] else "DIFFERENT")
                differ += same == "DIFFERENT"
                rows.append(row)
                print(f"{case:26s} {precision} {threads} thread(s)  {'  '.join(row[k] for k in sources)}  {same}")
    if args.against is not None:
        print(f"{len(rows) - differ} of {len(rows)} the same")
    if args.out:
        switch = [f"VAQKD_INT_CONV={os.environ['VAQKD_INT_CONV']}"] if "VAQKD_INT_CONV" in os.environ else []
        report = {"command": " ".join([*switch, "python", "benchmarks/fingerprint_matrix.py", *sys.argv[1:]]),
                  "this_git_sha": git_sha(ROOT), "against_git_sha": git_sha(args.against) if args.against else None,
                  "rows": rows, "env": environment(torch.device("cpu"), 0, "fp32")}  # fmt: skip
        write_output(args.out, report)


if __name__ == "__main__":
    main()
