"""Statistics over seeds: mean ± sample std, and paired differences with a Student-t 95 % interval."""

from __future__ import annotations

import math
from collections.abc import Sequence

# two-sided 95 % critical values t_{0.975, df} (df = 1..30), then 40, 60, 120, each rounded *up* at the third decimal
# (so an interval is never narrower than the exact one); tests/test_stats.py pins them to scipy.stats.t.ppf (scipy
# is in the analysis extra; the core does not need it)
_T975 = [12.707, 4.303, 3.183, 2.777, 2.571, 2.447, 2.365, 2.307, 2.263, 2.229, 2.201, 2.179, 2.161, 2.145,
         2.132, 2.120, 2.110, 2.101, 2.094, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.049,
         2.046, 2.043]  # fmt: skip
_T975_TAIL = [(40, 2.022), (60, 2.001), (120, 1.980)]


def t975(df: int) -> float:
    """t_{0.975, df}; between tabulated degrees of freedom, the value of the one below (never too narrow)."""
    if df < 1:
        raise ValueError("need at least 2 paired values (df >= 1) for an interval")
    if df <= 30:
        return _T975[df - 1]
    below = _T975[-1]
    for limit, t in _T975_TAIL:
        if df < limit:
            return below
        below = t
    return below


def mean_std(x: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); std is nan for one value."""
    n = len(x)
    m = sum(x) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in x) / (n - 1)) if n > 1 else float("nan")
    return m, sd


def paired_interval(a: Sequence[float], b: Sequence[float]) -> dict:
    """Mean of a_i - b_i with its 95 % t-interval (pairs share a seed). n = 1 gives no interval, and neither do
    n differences that are all equal (their sample sd is 0, so the t-interval would have no width)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired values must have the same non-zero length, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    m, sd = mean_std(d)
    n = len(d)
    if not all(math.isfinite(v) for v in d):  # a damaged record: no comparison can say anything
        return {"n": n, "mean": m, "lo": None, "hi": None, "verdict": "no verdict: a top-1 is not a finite number"}
    if n == 1:
        return {"n": 1, "mean": m, "lo": None, "hi": None, "verdict": "n = 1: no interval, one seed cannot tell"}
    if max(d) - min(d) <= 1e-9 * max(1.0, abs(m)):  # equal up to float noise (top-1 moves in steps of one image)
        # a zero-width t-interval would call any such difference real; equal differences only say the seeds
        # happened to land alike (e.g. +12 images in each of three pairs)
        return {"n": n, "mean": m, "lo": None, "hi": None, "sd": 0.0,
                "verdict": f"all {n} differences equal: no spread to size an interval from, no verdict"}  # fmt: skip
    half = t975(n - 1) * sd / math.sqrt(n)
    lo, hi = m - half, m + half
    if lo <= 0 <= hi:
        verdict = f"not distinguishable from zero at n = {n}"
    else:
        verdict = f"{'higher' if m > 0 else 'lower'}, interval excludes zero at n = {n}"
    return {"n": n, "mean": m, "lo": lo, "hi": hi, "sd": sd, "verdict": verdict}
