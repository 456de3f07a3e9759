"""The hand-typed t table against scipy's quantile: every tabulated value to its 3 decimals, and never narrower."""

import pytest

from vaqkd.analysis.stats import t975

stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("df", [*range(1, 31), 40, 60, 120])
def test_tabulated_values_are_scipys_to_three_decimals(df):
    assert t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=5e-4)


def test_between_and_beyond_the_table_the_interval_is_never_too_narrow():
    for df in range(1, 2000):
        assert t975(df) >= stats.t.ppf(0.975, df) - 5e-4, df
