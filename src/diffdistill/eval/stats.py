"""Summaries over independent runs (seeds): Student-t confidence intervals and Welch's t-test.

A figure measured on N training seeds is reported as mean ± t_{(1+c)/2, N−1} · s/√N (s: the sample standard
deviation, ddof 1), the usual t-interval for a mean from a small sample; with N = 1 there is no interval. Two
methods differ significantly when Welch's unequal-variance t-test gives p < 0.05 (``ALPHA``).
"""

from __future__ import annotations

import math
from typing import Sequence

ALPHA = 0.05  # significance level of the method comparisons


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float | None]:
    """(mean, half-width) of the two-sided Student-t interval for the mean of ``values``; half-width None for one
    value (no spread to estimate). None values are dropped."""
    from scipy import stats

    v = [float(x) for x in values if x is not None]
    if not v:
        raise ValueError("t_interval needs at least one value")
    n = len(v)
    mean = sum(v) / n
    if n == 1:
        return mean, None
    s = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * s / math.sqrt(n)


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test (unequal variances) for mean(a) = mean(b); None with fewer than 2 values
    on a side. Two constant samples: 1.0 when equal, 0.0 otherwise (the t statistic is 0/0 or ±∞)."""
    from scipy import stats

    a, b = [float(x) for x in a if x is not None], [float(x) for x in b if x is not None]
    if min(len(a), len(b)) < 2:
        return None
    if max(a) == min(a) and max(b) == min(b):
        return 1.0 if a[0] == b[0] else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def fmt_ci(mean: float | None, half: float | None, spec: str = ".4g") -> str:
    """'m ± h' (or 'm' without an interval, '–' without a value), both with the format ``spec``."""
    if mean is None:
        return "–"
    return f"{mean:{spec}}" if half is None else f"{mean:{spec}} ± {half:{spec}}"
