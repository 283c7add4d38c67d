"""Intervals, power and outcomes of a claim's test: the statistics under every verdict of the book.

A claim compares two methods on the same test cases, so its data are **paired differences**, one
per case (method A's score minus method B's, in the metric's unit: 0.10 is 10 points).  The
estimate is a mean of them, or a contrast of the tasks' means (the paper weighs each task the
same; experiment 2 subtracts one task's mean from another's).  Its standard error respects how
the cases were drawn:

* cases of one **task** are a sample of their own (a stratum): the tasks' means are independent;
* cases of one **cluster** are not independent (two ConvSent records of one topic, or every case
  of one training seed): the variance is computed from cluster sums, the cluster-robust (CR1)
  estimator that ``statsmodels`` uses for ``cov_type="cluster"``, with ``G - 1`` degrees of
  freedom per task (combined across tasks by Welch-Satterthwaite);
* when a cluster holds cases of several tasks (a **seed**, the unit of replication), the
  contrast is computed once per cluster and the clusters' values are the sample (``G - 1``
  degrees of freedom): three seeds give two, and an interval as wide as that deserves.

The interval is Student's t, not a percentile bootstrap, which covers only about 85% at n = 5.
Without clusters and tasks it is exactly ``scipy.stats.ttest_1samp``'s (a test checks it).

The **minimum detectable effect** (mde) is the smallest true gain the design finds with 80%
power in a two-sided 5% test, ``(t[0.975] + t[0.80]) * se``: about ``2.8 s / sqrt(n)`` for n
independent cases of standard deviation s.  Since the standard error shrinks as ``1/sqrt(n)``,
``cases_needed`` scales n by ``(mde / target)^2``: the number of cases (or clusters) that would
bring the mde down to the paper's effect or the equivalence margin.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests

__all__ = ["Assessment", "assess_gain", "assess_equivalence", "holm", "tost_pvalue", "linear_estimate", "Interval",
           "half_sample_interval", "POWER", "ALPHA",
           "GAIN_OUTCOMES", "EQUIVALENCE_OUTCOMES"]

#: Two-sided level of a gain's interval (95%); an equivalence test's two one-sided tests use 2 * ALPHA (90%).
ALPHA = 0.05
#: The power the minimum detectable effect is stated for.
POWER = 0.80

#: What each outcome of a gain test means (``low``/``high``: the 95% interval; ``effect``: the paper's size).
GAIN_OUTCOMES = {
    "reproduces": "a gain (the interval is above zero) consistent with the paper's size (it reaches the effect)",
    "direction only": "a gain (the interval is above zero), but smaller than the paper's: the effect is ruled out",
    "contradicted": "no gain is shown and the paper's size is ruled out (the interval ends below the effect)",
    "inconclusive": "these data cannot tell: the interval holds both zero and the paper's effect",
}
#: What each outcome of an equivalence test means (the 90% interval against +/- the margin).
EQUIVALENCE_OUTCOMES = {
    "reproduces": "equivalent: the 90% interval lies inside the margin on both sides",
    "contradicted": "not equivalent: the 90% interval lies entirely outside the margin",
    "inconclusive": "these data cannot tell: the 90% interval crosses the margin",
}


@dataclass(frozen=True)
class Assessment:
    """A claim's test on its paired differences.  Units are the metric's (0.10 = 10 points)."""

    kind: str          # "gain" or "equivalence"
    outcome: str       # a key of GAIN_OUTCOMES or EQUIVALENCE_OUTCOMES
    estimate: float    # the mean difference (or the contrast of the tasks' means)
    low: float         # interval: 95% for a gain, 90% (two one-sided 5% tests) for equivalence
    high: float
    level: float       # 0.95 or 0.90
    se: float          # standard error of the estimate
    df: float          # degrees of freedom of its t distribution
    mde: float         # minimum detectable effect (gain) or margin (equivalence), 80% power
    n: int             # test cases
    clusters: int      # independent units the interval rests on (cases, topics or seeds)
    target: float      # the paper's effect (gain) or the equivalence margin

    # the keys of the older ``{"difference", "low", "high"}`` dictionaries
    def __getitem__(self, key: str) -> float:
        return self.estimate if key == "difference" else getattr(self, key)

    @property
    def meaning(self) -> str:
        return (GAIN_OUTCOMES if self.kind == "gain" else EQUIVALENCE_OUTCOMES)[self.outcome]

    def cases_needed(self) -> int | None:
        """Cases (of this design) that would bring the mde down to the target: ``n (mde/target)^2``
        (clusters scale the same way); None where the target is 0 or the spread unknown."""
        if not (self.target > 0 and math.isfinite(self.mde)):
            return None
        return max(self.n, math.ceil(self.n * (self.mde / self.target) ** 2))

    def points(self, digits: int = 1) -> str:
        """``+16.0 [+1.3, +30.6]``: the estimate and its interval in points."""
        return f"{100 * self.estimate:+.{digits}f} [{100 * self.low:+.{digits}f}, {100 * self.high:+.{digits}f}]"

    def as_dict(self) -> dict:
        return {**asdict(self), "cases_needed": self.cases_needed(), "meaning": self.meaning}


def _stratum_variance(values: np.ndarray, clusters: np.ndarray) -> tuple[float, int]:
    """CR1 variance of one stratum's mean from its cluster sums, and its cluster count."""
    centred = values - values.mean()
    _, inverse = np.unique(clusters, return_inverse=True)
    sums = np.bincount(inverse, weights=centred)
    g = len(sums)
    if g < 2:
        return math.nan, g
    return float(g / (g - 1) * np.sum(sums ** 2) / len(values) ** 2), g


def linear_estimate(values: Sequence[float], *, groups: Sequence | None = None, strata: Sequence | None = None,
                    contrast: Mapping[object, float] | None = None) -> tuple[float, float, float, int, int]:
    """``(estimate, se, df, n, clusters)`` of ``sum_k c_k mean_k(values)``.

    ``strata``: a task label per case (default: one stratum); ``contrast``: a coefficient per
    stratum (default: each stratum weighs the same, ``1/K``; strata missing from it weigh 0);
    ``groups``: a cluster label per case (default: each case its own)."""
    v = np.asarray(values, dtype=float)
    n = len(v)
    if n == 0:
        raise ValueError("linear_estimate: no cases")
    if not np.isfinite(v).all():
        raise ValueError("linear_estimate: a difference is NaN or infinite (a metric missing on some case?)")
    s = np.zeros(n, dtype=int) if strata is None else np.asarray(strata, dtype=object)
    labels = list(dict.fromkeys(s.tolist()))
    coef = {k: 1 / len(labels) for k in labels} if contrast is None else dict(contrast)
    unknown = set(coef) - set(labels)
    if unknown:
        raise ValueError(f"linear_estimate: no case of stratum {sorted(map(str, unknown))}")
    g = np.arange(n) if groups is None else np.asarray(groups, dtype=object)
    if len(s) != n or len(g) != n:
        raise ValueError("linear_estimate: values, strata and groups differ in length")

    def point(mask: np.ndarray) -> float:
        return float(sum(c * v[mask & (s == k)].mean() for k, c in coef.items() if c))

    everything = np.ones(n, dtype=bool)
    estimate = point(everything)
    used = np.isin(s, [k for k, c in coef.items() if c])
    cluster_ids = list(dict.fromkeys(g[used].tolist()))
    crossing = any(len(set(s[used & (g == c)].tolist())) > 1 for c in cluster_ids) if groups is not None else False
    if crossing:  # clusters hold several strata (seeds): one contrast per cluster, t over clusters
        per_cluster = []
        for c in cluster_ids:
            mask = g == c
            if not all(np.any(mask & (s == k)) for k, w in coef.items() if w):
                raise ValueError(f"linear_estimate: cluster {c!r} lacks a stratum of the contrast")
            per_cluster.append(point(mask))
        k = len(per_cluster)
        se = float(np.std(per_cluster, ddof=1) / math.sqrt(k)) if k > 1 else math.nan
        return estimate, se, float(k - 1), int(used.sum()), k
    parts, dfs, total_clusters = [], [], 0
    for k, c in coef.items():
        if not c:
            continue
        mask = s == k
        var, gk = _stratum_variance(v[mask], g[mask])
        parts.append(c * c * var)
        dfs.append(gk - 1)
        total_clusters += gk
    variance = float(sum(parts))
    if not math.isfinite(variance):
        return estimate, math.nan, math.nan, int(used.sum()), total_clusters
    denominator = sum(p * p / d for p, d in zip(parts, dfs) if p > 0)
    df = variance ** 2 / denominator if denominator > 0 else float(sum(dfs))  # Welch-Satterthwaite
    return estimate, math.sqrt(variance), float(df), int(used.sum()), total_clusters


def _quantile(p: float, df: float) -> float:
    return float(stats.t.ppf(p, df)) if math.isfinite(df) and df > 0 else math.inf


def assess_gain(diff: Sequence[float], effect: float, *, groups: Sequence | None = None,
                strata: Sequence | None = None, contrast: Mapping[object, float] | None = None,
                seed: int = 0) -> Assessment:
    """Is method A ahead of method B, and by about the paper's ``effect``?

    ``diff``: one paired difference per test case (A minus B); ``effect``: the paper's size in the
    same unit.  Outcome, with ``[low, high]`` the 95% interval of the mean difference:
    "reproduces" (low > 0, high >= effect), "direction only" (low > 0, high < effect),
    "contradicted" (low <= 0, high < effect), "inconclusive" (low <= 0, high >= effect).
    ``groups``, ``strata``, ``contrast``: see :func:`linear_estimate`.  ``seed`` is accepted for
    the callers that pass one to every test; the t interval draws nothing."""
    del seed
    estimate, se, df, n, clusters = linear_estimate(diff, groups=groups, strata=strata, contrast=contrast)
    half = _quantile(1 - ALPHA / 2, df) * se if math.isfinite(se) else math.inf
    low, high = estimate - half, estimate + half
    mde = (_quantile(1 - ALPHA / 2, df) + _quantile(POWER, df)) * se if math.isfinite(se) else math.inf
    if low > 0:
        outcome = "reproduces" if high >= effect else "direction only"
    else:
        outcome = "inconclusive" if high >= effect else "contradicted"
    return Assessment("gain", outcome, estimate, low, high, 1 - ALPHA, se, df, mde, n, clusters, effect)


def assess_equivalence(diff: Sequence[float], margin: float, *, groups: Sequence | None = None,
                       strata: Sequence | None = None, contrast: Mapping[object, float] | None = None,
                       seed: int = 0) -> Assessment:
    """Are methods A and B equivalent within ``+/- margin``?  Two one-sided 5% tests (TOST): the
    90% interval inside the margin on both sides is "reproduces", entirely outside it
    "contradicted", otherwise "inconclusive".  The mde is the smallest margin that the design
    shows with 80% power when the true difference is 0: ``(t[0.95] + t[0.90]) * se``."""
    del seed
    estimate, se, df, n, clusters = linear_estimate(diff, groups=groups, strata=strata, contrast=contrast)
    half = _quantile(1 - ALPHA, df) * se if math.isfinite(se) else math.inf
    low, high = estimate - half, estimate + half
    mde = (_quantile(1 - ALPHA, df) + _quantile(1 - (1 - POWER) / 2, df)) * se if math.isfinite(se) else math.inf
    if -margin < low and high < margin:
        outcome = "reproduces"
    elif low >= margin or high <= -margin:
        outcome = "contradicted"
    else:
        outcome = "inconclusive"
    return Assessment("equivalence", outcome, estimate, low, high, 1 - 2 * ALPHA, se, df, mde, n, clusters, margin)


def tost_pvalue(a: Assessment) -> float:
    """The p-value of an equivalence test: the larger of its two one-sided tests' p-values."""
    if not (math.isfinite(a.se) and a.se > 0):
        return 0.0 if a.outcome == "reproduces" else 1.0
    lower = stats.t.sf((a.estimate + a.target) / a.se, a.df)
    upper = stats.t.cdf((a.estimate - a.target) / a.se, a.df)
    return float(max(lower, upper))


def holm(pvalues: Sequence[float], alpha: float = ALPHA) -> tuple[list[bool], list[float]]:
    """Holm's step-down correction (``statsmodels``): which hypotheses are rejected, and the
    adjusted p-values."""
    if len(pvalues) == 0:
        return [], []
    reject, adjusted, _, _ = multipletests(list(pvalues), alpha=alpha, method="holm")
    return [bool(r) for r in reject], [float(p) for p in adjusted]


@dataclass(frozen=True)
class Interval:
    """A descriptive measure (a silhouette, an overlap, a regularity) with its interval."""

    estimate: float
    low: float
    high: float
    level: float
    n: int          # edits the measure is computed on
    halves: int     # half-samples the spread comes from

    def __getitem__(self, key: str) -> float:
        return self.estimate if key == "difference" else getattr(self, key)

    def text(self, digits: int = 2) -> str:
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def half_sample_interval(statistic, labels: Sequence, *, halves: int = 50, seed: int = 0,
                         level: float = 1 - ALPHA) -> Interval:
    """The interval of a measure computed on a set of edits, from random halves of the edits.

    ``statistic(index)`` computes the measure on the edits ``index`` (an integer array; pass the
    same index to every editor's vectors to keep a difference paired).  Each half keeps half of
    every label's edits, without replacement: a bootstrap would repeat edits, and a repeated edit
    is its own nearest neighbour.  For a mean, the spread of a half-sample's value around the
    whole sample's equals the whole sample's standard error (the finite-population correction of
    drawing n/2 of n); the interval is ``estimate +/- z * sd(halves)`` (the delete-half jackknife).
    Measures that depend on the number of points (nearest neighbours at a fixed k) take their
    spread from halves, which makes the interval an approximation, stated where it is used."""
    labels = np.asarray(labels, dtype=object)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(labels == lab) for lab in dict.fromkeys(labels.tolist())]
    if min(len(g) for g in groups) < 4:
        raise ValueError("half_sample_interval: every label needs at least 4 edits (2 in each half)")
    estimate = float(statistic(np.arange(len(labels))))
    values = []
    for _ in range(halves):
        index = np.sort(np.concatenate([rng.choice(g, len(g) // 2, replace=False) for g in groups]))
        values.append(float(statistic(index)))
    half = float(stats.norm.ppf(1 - (1 - level) / 2)) * float(np.std(values, ddof=1))
    return Interval(estimate, estimate - half, estimate + half, level, len(labels), halves)
