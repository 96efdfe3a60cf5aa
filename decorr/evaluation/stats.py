"""Confidence intervals and paired tests for rates counted over test images.

- :func:`wilson_interval`: the Wilson score interval of a binomial proportion ``k / n`` (what
  ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")`` gives, without continuity correction);
  ``None`` when ``n == 0``. Every accuracy and transfer rate of the transfer evaluation carries one
  (``*_ci95``, 95%).
- :func:`mcnemar_exact`: McNemar's exact test of two paired binary outcomes: the two-sided binomial
  test of ``b`` successes in ``b + c`` trials with p = 1/2 on the discordant pairs (``b``: only the first
  outcome is true, ``c``: only the second). ``p = min(1, 2 * P(X <= min(b, c)))``, X ~ Bin(b + c, 1/2);
  1 when there is no discordant pair. :func:`mcnemar` counts the pairs from two boolean arrays.

- :func:`t_interval`: the mean of a few numbers (one per training seed) and its Student-t interval, the
  quantile from ``scipy.stats.t`` (the tests check it against a hand-computed value).

Wilson and McNemar are computed in exact integer arithmetic (scipy is the tests' oracle for them).
"""

from __future__ import annotations

import math
from fractions import Fraction
from statistics import NormalDist, mean, stdev
from typing import NamedTuple, Sequence

import numpy as np

from decorr.errors import DecorrError

__all__ = ["McNemar", "mcnemar", "mcnemar_exact", "t_interval", "wilson_interval"]


def _check_count(successes: int, n: int) -> None:
    if isinstance(successes, bool) or isinstance(n, bool) or int(successes) != successes or int(n) != n:
        raise DecorrError(f"counts must be integers, got {successes!r} of {n!r}")
    if n < 0 or not 0 <= successes <= n:
        raise DecorrError(f"a count must satisfy 0 <= successes <= n, got {successes} of {n}")


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval ``(low, high)`` of the proportion ``successes / n``; None when ``n == 0``.

    ``center = (k + z^2/2) / (n + z^2)``, ``half = z / (n + z^2) * sqrt(k (n - k) / n + z^2 / 4)``, z the
    two-sided normal quantile of ``confidence``. The bounds are exactly 0 at ``k = 0`` and 1 at ``k = n``.
    """
    _check_count(successes, n)
    if not 0 < confidence < 1:
        raise DecorrError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence}")
    k, n = int(successes), int(n)
    if n == 0:
        return None
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    z2 = z * z
    center = (k + z2 / 2) / (n + z2)
    half = z / (n + z2) * math.sqrt(k * (n - k) / n + z2 / 4)
    low = 0.0 if k == 0 else max(0.0, center - half)
    high = 1.0 if k == n else min(1.0, center + half)
    return (low, high)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts ``b`` and ``c`` (see module docstring)."""
    for value in (b, c):
        if isinstance(value, bool) or int(value) != value or value < 0:
            raise DecorrError(f"discordant counts must be integers >= 0, got b={b!r}, c={c!r}")
    b, c = int(b), int(c)
    n = b + c
    if n == 0 or b == c:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


class McNemar(NamedTuple):
    #: Pairs where only the first outcome is true.
    only_first: int
    #: Pairs where only the second outcome is true.
    only_second: int
    #: Exact two-sided p-value.
    p_value: float


def mcnemar(first: np.ndarray, second: np.ndarray) -> McNemar:
    """McNemar's exact test of two boolean outcome arrays on the same samples (same order)."""
    first, second = np.asarray(first, dtype=bool), np.asarray(second, dtype=bool)
    if first.shape != second.shape or first.ndim != 1:
        raise DecorrError(f"paired outcomes must be two 1-D arrays of one length, got shapes {first.shape} "
                          f"and {second.shape}")
    b = int((first & ~second).sum())
    c = int((~first & second).sum())
    return McNemar(b, c, mcnemar_exact(b, c))


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, tuple[float, float] | None]:
    """The mean of ``values`` and its Student-t interval (``None`` with fewer than two values)."""
    values = [float(v) for v in values]
    if not values or not all(math.isfinite(v) for v in values):
        raise DecorrError(f"a t-interval needs finite values, got {values}")
    centre = mean(values)
    if len(values) < 2:
        return centre, None
    from scipy.stats import t as student_t  # the t quantile only; scipy is a dependency of the package

    half = student_t.ppf(0.5 + confidence / 2, len(values) - 1) * stdev(values) / math.sqrt(len(values))
    return centre, (centre - half, centre + half)
