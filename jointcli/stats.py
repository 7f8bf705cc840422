"""Statistics for comparing runs on the same examples: bootstrap intervals, McNemar, Pareto fronts.

    >>> bootstrap_ci([1, 0, 1, 1])  # (mean, low, high): the 95% interval over examples
    (0.75, 0.25, 1.0)
    >>> d = paired_difference([1, 1, 1, 0, 1, 1, 1, 1, 1, 1], [0, 0, 1, 0, 0, 1, 0, 0, 0, 0], binary=True)
    >>> d
    Difference(delta=0.7, low=0.4, high=1.0, only_a=7, only_b=0, p_mcnemar=0.015625)
    >>> d.significant
    True
    >>> pareto_front([(0.8, 900), (0.7, 400), (0.6, 950)])  # (quality up, cost down); cheapest first
    [1, 0]

Everything is seeded, so the same inputs give the same intervals in every process.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95


def bootstrap_ci(scores, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean, resampling examples."""
    x = np.asarray(scores, dtype=float)
    if x.size == 0:
        raise ValueError("no scores")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(x.mean()), float(low), float(high)


def mcnemar(a, b) -> tuple[int, int, float]:
    """Exact McNemar test on paired 0/1 outcomes: (a right & b wrong, a wrong & b right, two-sided p)."""
    from scipy.stats import binomtest

    a, b = np.asarray(a, dtype=float) > 0.5, np.asarray(b, dtype=float) > 0.5
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    if only_a + only_b == 0:
        return 0, 0, 1.0
    return only_a, only_b, float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


@dataclass
class Difference:
    """A's score minus B's on the same examples."""

    delta: float
    low: float
    high: float
    only_a: int | None = None  # binary metrics: examples A got right and B wrong
    only_b: int | None = None
    p_mcnemar: float | None = None

    @property
    def significant(self) -> bool:
        """The 95% interval excludes 0, and for binary metrics McNemar's test agrees (p < 0.05)."""
        excludes_zero = self.low > 0 or self.high < 0
        return excludes_zero and (self.p_mcnemar is None or self.p_mcnemar < 1 - LEVEL)


def paired_difference(a, b, binary: bool = False, seed: int = 0) -> Difference:
    """Paired bootstrap over examples of mean(a - b); McNemar's test as well when scores are 0/1."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired scores differ in length: {a.size} and {b.size}")
    delta, low, high = bootstrap_ci(a - b, seed=seed)
    if not binary:
        return Difference(delta, low, high)
    return Difference(delta, low, high, *mcnemar(a, b))


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: (quality, cost) with quality higher-better and
    cost lower-better. A point is dominated by one at least as good on both and better on one.
    Cheapest first (equal costs: the better quality first)."""
    front = []
    for i, (q, c) in enumerate(points):
        dominated = any(q2 >= q and c2 <= c and (q2 > q or c2 < c) for j, (q2, c2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][1], -points[i][0]))
