"""The hand-typed t table against scipy's quantile: each value rounded up at its 3rd decimal, never narrower."""

import pytest

from vaqkd.analysis.stats import t975

stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("df", [*range(1, 31), 40, 60, 120])
def test_tabulated_values_are_scipys_rounded_up_at_three_decimals(df):
    exact = stats.t.ppf(0.975, df)
    assert exact <= t975(df) < exact + 1e-3


def test_between_and_beyond_the_table_the_interval_is_never_too_narrow():
    for df in range(1, 2000):
        assert t975(df) >= stats.t.ppf(0.975, df), df


def test_a_difference_that_is_not_a_number_gives_no_verdict():
    from vaqkd.analysis.stats import paired_interval

    for bad in (float("nan"), float("inf")):
        p = paired_interval([bad, 41.0, 42.0], [40.0, 40.0, 40.0])
        assert p["lo"] is None and p["hi"] is None and p["verdict"].startswith("no verdict"), p
