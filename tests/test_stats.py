"""Wilson intervals and McNemar's exact test against scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from decorr.errors import DecorrError
from decorr.evaluation.stats import mcnemar, mcnemar_exact, wilson_interval

COUNTS = [(0, 1), (1, 1), (0, 10), (10, 10), (1, 10), (3, 7), (50, 100), (436, 1000), (9999, 10000), (1, 10000)]


@pytest.mark.parametrize("k,n", COUNTS)
def test_wilson_matches_scipy(k, n):
    expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(expected.low, abs=1e-12) and high == pytest.approx(expected.high, abs=1e-12)
    expected90 = binomtest(k, n).proportion_ci(confidence_level=0.9, method="wilson")
    assert wilson_interval(k, n, 0.9) == pytest.approx((expected90.low, expected90.high), abs=1e-12)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_wilson_edges():
    assert wilson_interval(0, 0) is None
    assert wilson_interval(0, 25)[0] == 0.0 and wilson_interval(25, 25)[1] == 1.0
    # By hand: k = 5, n = 10, z = 1.959964: centre 0.5, half = z / (n + z^2) * sqrt(2.5 + z^2 / 4).
    z = 1.959963984540054
    half = z / (10 + z * z) * np.sqrt(2.5 + z * z / 4)
    assert wilson_interval(5, 10) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-12)
    for bad in ((3, 2), (-1, 4), (1.5, 4)):
        with pytest.raises(DecorrError, match="count"):
            wilson_interval(*bad)
    with pytest.raises(DecorrError, match="confidence"):
        wilson_interval(1, 2, confidence=95)


@pytest.mark.parametrize("b,c", [(0, 0), (0, 1), (1, 0), (3, 3), (0, 10), (2, 9), (7, 3), (30, 47), (500, 560),
                                 (1200, 1333)])
def test_mcnemar_matches_scipy_binomtest(b, c):
    expected = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_mcnemar_by_hand_and_from_outcomes():
    # b = 1, c = 5: p = 2 * (C(6,0) + C(6,1)) / 2^6 = 14 / 64.
    assert mcnemar_exact(1, 5) == pytest.approx(14 / 64, rel=1e-15)
    first = np.array([1, 1, 0, 0, 0, 0, 0, 0, 1, 0], dtype=bool)
    second = np.array([1, 0, 1, 1, 1, 1, 1, 0, 1, 0], dtype=bool)
    result = mcnemar(first, second)
    assert (result.only_first, result.only_second) == (1, 5) and result.p_value == pytest.approx(14 / 64)
    with pytest.raises(DecorrError, match="discordant"):
        mcnemar_exact(-1, 2)
    with pytest.raises(DecorrError, match="one length"):
        mcnemar(first, second[:3])
