"""Always-valid comparison of a candidate with the control: a decision that may be read after every label.

A fixed-sample test read repeatedly ("peeking") calls false winners and losers far more often than its
alpha. The mixture sequential probability ratio test (mSPRT) of Johari et al. does not: its likelihood
ratio, mixed over a normal prior N(0, tau^2) on the difference, is a martingale under the truth, so by
Ville's inequality it exceeds 1/alpha with probability at most alpha *at any time*. Inverted, it gives a
confidence sequence: an interval for candidate - control that covers the truth at every peek at once.

The verdict splits the difference at -margin (non-inferiority): ``promote`` once the interval lies above
it, ``rollback`` once it lies below it, ``continue`` while it straddles it. Both false calls are bounded
by alpha (each by about alpha/2, as the interval is two-sided). The variance is a plug-in estimate,
counted per user where users are known (cluster-robust), and for 0/1 outcomes never below what the
difference being tested implies (:func:`least_variance`), which keeps rare errors from promoting early.

``python -m experiments.sequential`` runs the simulations of docs/experiments.md and prints their table.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

METHOD: dict[str, str] = {
    "name": "mSPRT confidence sequence",
    "description": "mixture sequential probability ratio test with a normal mixing distribution N(0, tau^2) "
                   "on the difference of means, inverted into an always-valid confidence interval",
    "variance": "plug-in V = var_control/n_control + var_candidate/n_candidate (paired: var_diff/n), each "
                "from per-user sums (CR1 sandwich) where user ids are given; for 0/1 outcomes at least "
                "|theta|(1 - |theta|)/n at each difference theta tested (score-type)",
    "reference": "R. Johari, P. Koomen, L. Pekelis, D. Walsh, 'Always Valid Inference: Continuous Monitoring "
                 "of A/B Tests', Operations Research 70(3):1806-1821, 2022, doi:10.1287/opre.2021.2135",
}

PROMOTE, ROLLBACK, CONTINUE = "promote", "rollback", "continue"
PER_OBSERVATION, CLUSTER_ROBUST, MIXED = "per-observation", "cluster-robust", "mixed"

DEFAULT_MARGIN = 0.005
"""Half an accuracy point, as in common/config.py's ``Decision``."""
DEFAULT_ALPHA = 0.05
DEFAULT_MIN_LABELS = 200
TAU_PER_MARGIN = 2.0
"""tau = 2 x margin. The interval is tightest where its half-width is about tau, and a decision needs the
half-width below the distance from the estimate to -margin: one margin for a candidate equal to the
control (the usual case: a quantized twin), several for one 2-3 points off. Against tau = margin, 2 x
margin costs 8% more labels in the first case and saves a third in the second (docs/experiments.md)."""
FALLBACK_TAU = 0.01
"""One accuracy point: tau when the margin is 0 (a superiority test), which then sets no scale."""
ACCURACY_BOUNDS = (0.0, 1.0)
"""The range of a correctness outcome (see :func:`variance_floor` and :func:`least_variance`)."""
MAX_LABELS_NEEDED = 10**9
"""Beyond this many more labels per arm, a decision is called out of reach (``labels_needed`` None)."""


SRM_PRIOR_CONCENTRATION = 100.0
"""The sample-ratio test's Dirichlet prior: centred on the configured shares, as concentrated as 100
units, so it looks for deviations of a few points of share. Simulated on an 80/20 split (peeks every
10 units, up to 3,000): 0 of 200 fair runs flagged at p < 0.001 (the chi-square, read at the same
peeks: 1.5-2.5%), a 74/26 split flagged after a median 795 units, a 70/30 split after 330."""


def srm_p_value(counts: ArrayLike, shares: ArrayLike, concentration: float = SRM_PRIOR_CONCENTRATION) -> float:
    """An always-valid p-value of a sample-ratio mismatch: units ``counts`` per variant against the
    configured ``shares``. The guardrail reads it at every round of the rollout controller, and a
    chi-square read that often flags fair splits many times more often than its level. This is the
    Bayes factor of a Dirichlet-multinomial alternative against the shares (M. Lindon, A. Malek,
    'Anytime-Valid Inference For Multinomial Count Data', NeurIPS 2022), a martingale under a fair
    split: 1 / factor is a p-value valid at any number of looks (scipy has no sequential test)."""
    from scipy.special import gammaln

    n = np.asarray(counts, dtype=np.float64)
    theta = np.asarray(shares, dtype=np.float64)
    theta = theta / theta.sum()
    prior = concentration * theta
    log_factor = (gammaln(prior.sum()) - gammaln(prior.sum() + n.sum()) + np.sum(gammaln(prior + n) - gammaln(prior))
                  - np.sum(n * np.log(theta)))
    return float(min(1.0, math.exp(-log_factor))) if log_factor < 700 else 0.0


@dataclass(frozen=True)
class Moments:
    """One arm's sufficient statistics for a cluster-robust variance of its mean.

    Fields are floats or arrays of one shape, so a simulation carries thousands of experiments at once.
    With each observation its own cluster (``groups == n``) the variance is the ordinary s^2/n.
    """

    n: Any
    """outcomes"""
    total: Any
    """sum of outcomes"""
    cluster_sq: Any
    """sum over clusters of (cluster sum)^2"""
    cluster_cross: Any
    """sum over clusters of cluster sum x cluster size"""
    size_sq: Any
    """sum over clusters of (cluster size)^2"""
    groups: Any
    """clusters seen"""


@dataclass(frozen=True)
class Sample:
    """One arm's outcomes (1/0 correctness or a reward) and, when known, who each came from."""

    outcomes: ArrayLike
    clusters: ArrayLike | None = None
    """user keys: one per outcome; None treats every outcome as independent"""


@dataclass(frozen=True)
class Comparison:
    """Candidate - control on a mean, with its always-valid interval and the verdict it supports."""

    estimate: float | None
    lower: float | None
    upper: float | None
    n: dict[str, int]
    variance: str
    """``cluster-robust`` (per-user sums), ``per-observation``, or ``mixed`` (one arm each)"""
    verdict: str
    labels_needed: int | None
    """more labels per arm until the interval would clear -margin, if estimate and variance stay"""
    reason: str
    margin: float
    alpha: float
    tau: float
    min_labels: int
    discordant: dict[str, int] | None = None
    """paired comparisons only: rows only the live answer got right, and only the shadow got right"""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, with the method and its parameters, as ``/experiments/{model}/decision`` shows it."""
        out = {k: _finite(v) for k, v in asdict(self).items()}
        parameters = {k: out.pop(k) for k in ("margin", "alpha", "tau", "min_labels")}
        return {**out, "method": {**METHOD, "parameters": parameters}}


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def moments(outcomes: ArrayLike, clusters: ArrayLike | None = None) -> Moments:
    """The sufficient statistics of one arm; per observation when no clusters are given."""
    y = np.asarray(outcomes, dtype=float)
    if clusters is None:
        return Moments(y.size, y.sum(), (y**2).sum(), y.sum(), float(y.size), float(y.size))
    codes = np.unique(np.asarray(clusters), return_inverse=True)[1].ravel()
    if codes.size != y.size:
        raise ValueError(f"{y.size} outcomes but {codes.size} cluster ids")
    sums, sizes = np.bincount(codes, weights=y), np.bincount(codes).astype(float)
    return Moments(y.size, y.sum(), (sums**2).sum(), (sums * sizes).sum(), (sizes**2).sum(),
                   float(sizes.size))


def variance_of_mean(m: Moments) -> Any:
    """CR1 sandwich: G/(G-1) * sum_g (S_g - n_g * mean)^2 / n^2; infinite below two clusters."""
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.divide(m.total, m.n)
        spread = np.maximum(m.cluster_sq - 2 * mean * m.cluster_cross + mean**2 * m.size_sq, 0.0)
        groups = np.asarray(m.groups, dtype=float)  # numpy division: one cluster gives inf, not an exception
        return np.where(groups > 1, groups / (groups - 1) * spread / np.square(m.n), np.inf)


def variance_floor(n: Any, spread: float) -> Any:
    """The variance of a mean of n outcomes that include the lowest and the highest possible one once.

    Keeps an arm that has shown no variation yet (every answer right so far) from claiming certainty;
    it fades as 1/n^2, far below any real variance.
    """
    with np.errstate(divide="ignore"):
        return np.where(np.asarray(n) > 1, spread**2 / (2 * np.asarray(n) * (np.asarray(n) - 1.0)), np.inf)


def floored_variance(m: Moments, spread: float) -> Any:
    """The variance of a mean, floored (see :func:`variance_floor`)."""
    return np.maximum(variance_of_mean(m), variance_floor(m.n, spread))


def least_variance(theta: Any, spread: float, binary: bool) -> Any:
    """The least per-row variance a difference theta allows between 0/1 outcomes: |theta| (spread - |theta|).

    A candidate cannot be theta worse (or better) unless at least a |theta| share of rows goes one way
    only, split or paired alike. Where such rows are rare (very accurate models, a shadow twin that seldom
    disagrees) their plug-in variance runs low exactly when they happen to be fewer, which would promote
    too early; at each hypothesised difference the interval therefore uses at least this variance, the
    idea of score intervals (Wilson; Miettinen and Nurminen): the variance under the hypothesis tested.
    Graded rewards have no such bound: 0.
    """
    if not binary:
        return np.zeros_like(np.asarray(theta, dtype=float))
    size = np.minimum(np.abs(theta), spread)
    return size * (spread - size)


def half_width(variance: Any, tau: float, alpha: float) -> Any:
    """Half-width of the mSPRT confidence sequence: where the mixture likelihood ratio reaches 1/alpha.

    sqrt(V (V + tau^2) / tau^2 * (2 log(1/alpha) + log((V + tau^2) / V))), V the variance of the estimate.
    """
    v = np.asarray(variance, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = tau**2 / v
        width = np.sqrt(v * (1 + 1 / ratio) * (2 * np.log(1 / alpha) + np.log1p(ratio)))
    return np.where(np.isfinite(v), width, np.inf)


@dataclass(frozen=True)
class Evidence:
    """An estimated difference and what its variance is at any hypothesised difference.

    Fields are floats or arrays of one shape (a simulation's runs x peeks). The confidence sequence is
    every theta with |estimate - theta| <= half_width(variance_at(theta)).
    """

    estimate: Any
    plugin: Any
    """plug-in variance of the estimate: cluster-robust or per observation, floored"""
    n: Any
    """labels of the larger arm (paired: rows)"""
    spread: float
    """the range one outcome can take"""
    binary: bool
    """every outcome one of its two bounds (correctness), so :func:`least_variance` applies"""

    def variance_at(self, theta: Any) -> Any:
        """The estimate's variance were the true difference theta."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.maximum(self.plugin, least_variance(theta, self.spread, self.binary) / self.n)

    def excludes(self, theta: Any, tau: float, alpha: float) -> Any:
        """Whether theta lies outside the always-valid interval."""
        return np.abs(self.estimate - theta) > half_width(self.variance_at(theta), tau, alpha)

    def interval(self, tau: float, alpha: float) -> tuple[float, float]:
        """The interval's ends: where |estimate - theta| meets the half-width, on either side."""
        widest = float(half_width(self.variance_at(self.spread / 2), tau, alpha))  # the least variance's peak
        if not (math.isfinite(self.estimate) and math.isfinite(widest)):
            return -math.inf, math.inf

        from scipy.optimize import brentq

        def gap(theta: float) -> float:
            return abs(self.estimate - theta) - float(half_width(self.variance_at(theta), tau, alpha))

        # A difference of two means lies within +-spread: the search stops there, and an end still
        # inside the half-width there is that bound (few labels: the interval covers every difference).
        low, high = max(self.estimate - widest, -self.spread), min(self.estimate + widest, self.spread)
        return (low if gap(low) <= 0 else brentq(gap, low, self.estimate),
                high if gap(high) <= 0 else brentq(gap, self.estimate, high))


def verdicts(estimate: Any, margin_excluded: Any, margin: float, enough: Any) -> NDArray[np.str_]:
    """``promote`` when the interval lies above -margin, ``rollback`` below it, else ``continue``;
    ``continue`` too without enough labels."""
    decided = np.asarray(enough) & np.asarray(margin_excluded)
    return np.select([decided & (np.asarray(estimate) > -margin), decided & (np.asarray(estimate) < -margin)],
                     [PROMOTE, ROLLBACK], CONTINUE)


def default_tau(margin: float) -> float:
    """The mixing standard deviation matched to the margin (see :data:`TAU_PER_MARGIN`)."""
    return TAU_PER_MARGIN * margin if margin > 0 else FALLBACK_TAU


def labels_needed(distance: float, arms: list[tuple[float, int]], tau: float, alpha: float,
                  least: float = 0.0) -> int | None:
    """More labels per arm until the half-width at -margin falls below ``distance`` (estimate to -margin).

    ``arms`` holds (variance of the mean, labels) per arm; each arm's variance per label is assumed to stay;
    ``least`` is the per-row variance at -margin (:func:`least_variance`).
    """
    if not (distance > 0 and all(math.isfinite(v) and n > 0 for v, n in arms)):
        return None
    most = max(n for _, n in arms)

    from scipy.optimize import brentq

    def excess(more: float) -> float:
        variance = max(sum(v * n / (n + more) for v, n in arms), least / (most + more))
        return float(half_width(variance, tau, alpha)) - distance

    if excess(0) < 0:
        return 0
    if excess(MAX_LABELS_NEEDED) > 0:
        return None
    return math.ceil(brentq(excess, 0, MAX_LABELS_NEEDED, xtol=0.5))


def compare(control: Sample, candidate: Sample, margin: float = DEFAULT_MARGIN, alpha: float = DEFAULT_ALPHA,
            min_labels: int = DEFAULT_MIN_LABELS, tau: float | None = None,
            bounds: tuple[float, float] = ACCURACY_BOUNDS) -> Comparison:
    """The split comparison: candidate - control over two independent groups of users.

    ``bounds`` is the range outcomes can take (0..1 for correctness, widened by any reward outside it).
    """
    arms = [control, candidate]
    stats = [moments(a.outcomes, a.clusters) for a in arms]
    outcomes = [np.asarray(a.outcomes, dtype=float) for a in arms]
    low, high = _range(outcomes, bounds)
    variances = [float(floored_variance(m, high - low)) for m in stats]
    means = [m.total / m.n if m.n else math.nan for m in stats]
    return _judge(means[1] - means[0], variances, [int(m.n) for m in stats], high - low,
                  _binary(outcomes, (low, high)), _variance_kind([a.clusters is not None for a in arms]),
                  margin, alpha, min_labels, tau)


def paired(live_correct: ArrayLike, shadow_correct: ArrayLike, clusters: ArrayLike | None = None,
           margin: float = DEFAULT_MARGIN, alpha: float = DEFAULT_ALPHA, min_labels: int = DEFAULT_MIN_LABELS,
           tau: float | None = None, bounds: tuple[float, float] = ACCURACY_BOUNDS) -> Comparison:
    """The shadow comparison: shadow - live on the same labelled rows, from per-row differences.

    Rows both answered alike add nothing but their count: the discordant pairs drive the estimate and
    its variance (McNemar's idea), which is why it needs far fewer labels than a split.
    """
    live, shadow = np.asarray(live_correct, dtype=float), np.asarray(shadow_correct, dtype=float)
    if live.shape != shadow.shape:
        raise ValueError(f"live has {live.size} rows but shadow {shadow.size}")
    diff = shadow - live
    stats = moments(diff, clusters)
    low, high = _range([live, shadow], bounds)
    variance = float(floored_variance(stats, 2 * (high - low)))  # a difference spans twice the range
    result = _judge(diff.mean() if diff.size else math.nan, [variance], [diff.size], high - low,
                    _binary([live, shadow], (low, high)), _variance_kind([clusters is not None]), margin,
                    alpha, min_labels, tau)
    discordant = {"live_only": int((diff < 0).sum()), "shadow_only": int((diff > 0).sum())}
    return replace(result, discordant=discordant)


def _range(outcomes: list[NDArray[np.float64]], bounds: tuple[float, float]) -> tuple[float, float]:
    """The range outcomes can take: the bounds, widened by any outcome seen outside them."""
    seen = np.concatenate(outcomes)
    low, high = min(bounds[0], seen.min(initial=bounds[0])), max(bounds[1], seen.max(initial=bounds[1]))
    if not high > low:
        raise ValueError(f"outcome bounds {bounds} span nothing")
    return low, high


def _binary(outcomes: list[NDArray[np.float64]], bounds: tuple[float, float]) -> bool:
    """Whether every outcome is one of the two bounds (correctness), not a graded reward."""
    return all(np.isin(y, bounds).all() for y in outcomes)


def _variance_kind(clustered: list[bool]) -> str:
    return CLUSTER_ROBUST if all(clustered) else PER_OBSERVATION if not any(clustered) else MIXED


def _judge(estimate: float, variances: list[float], ns: list[int], spread: float, binary: bool, kind: str,
           margin: float, alpha: float, min_labels: int, tau: float | None) -> Comparison:
    """Interval, verdict, labels still needed and the sentence that says why, for one comparison."""
    tau = default_tau(margin) if tau is None else tau
    evidence = Evidence(estimate, sum(variances), max(ns), spread, binary)
    lower, upper = evidence.interval(tau, alpha)
    enough = min(ns) >= min_labels
    verdict = str(verdicts(estimate, not lower <= -margin <= upper, margin, enough))
    needed = None
    if verdict != CONTINUE:
        needed = 0
    elif math.isfinite(estimate):
        needed = labels_needed(abs(estimate + margin), list(zip(variances, ns, strict=True)), tau, alpha,
                               float(least_variance(margin, spread, binary)))
    if not enough and needed is not None:
        needed = max(needed, min_labels - min(ns))
    names = ["control", "candidate"] if len(ns) == 2 else ["paired"]
    reason = _reason(verdict, lower, upper, margin, alpha, enough, min_labels, needed)
    n = dict(zip(names, ns, strict=True))
    return Comparison(_finite(estimate), _finite(lower), _finite(upper), n, kind,
                      verdict, needed, reason, margin, alpha, tau, min_labels)


def _reason(verdict: str, lower: float, upper: float, margin: float, alpha: float, enough: bool,
            min_labels: int, needed: int | None) -> str:
    interval = f"the always-valid {1 - alpha:.0%} interval [{lower:+.4f}, {upper:+.4f}]"
    if not enough:
        return f"Waiting for {min_labels} labels per variant before any verdict."
    if verdict == PROMOTE:
        return f"Non-inferior: {interval} for candidate - control lies above -{margin:g}, the margin."
    if verdict == ROLLBACK:
        return f"Inferior: {interval} for candidate - control lies below -{margin:g}, the margin."
    more = "an unknown number of labels" if needed is None else f"about {needed} more labels per variant"
    return f"Undecided: {interval} still contains -{margin:g}, the margin; {more} should settle it."


@dataclass(frozen=True)
class Simulation:
    """What many simulated experiments, each read after every ``every`` labels per arm, decided."""

    control_rate: float
    candidate_rate: float
    runs: int
    max_labels: int
    first_verdict: dict[str, float]
    """share of runs whose first verdict other than ``continue`` was this one (``continue``: none came)"""
    median_labels: float | None
    """labels per arm at that first verdict, median over the runs that reached one"""
    ever: dict[str, float]
    """share of runs that, at some peek with enough labels, saw: ``rollback``, ``promote``, ``superior``
    (lower > 0), ``miss`` (the interval excluded the true difference)"""


def simulate(control_rate: float, candidate_rate: float, *, runs: int = 1000, max_labels: int = 20_000,
             every: int = 10, margin: float = DEFAULT_MARGIN, alpha: float = DEFAULT_ALPHA,
             min_labels: int = DEFAULT_MIN_LABELS, tau: float | None = None, seed: int = 0) -> Simulation:
    """Split experiments on 0/1 outcomes with the given true accuracies, peeking every ``every`` labels."""
    rng = np.random.default_rng(seed)
    n = np.broadcast_to(every * np.arange(1.0, max_labels // every + 1), (runs, max_labels // every))
    arms = [np.cumsum(rng.binomial(every, p, size=n.shape), axis=1).astype(float)
            for p in (control_rate, candidate_rate)]
    control, candidate = (Moments(n, s, s, s, n, n) for s in arms)  # 0/1 outcomes, each its own cluster
    rates = (control_rate, candidate_rate)
    return _summarise(_split(control, candidate), candidate_rate - control_rate, rates, margin, alpha,
                      min_labels, tau)


DECIMALS = 12
"""Shares derived from rates are rounded to this many decimals, so that 0.95 - 0.945 is 0.005 exactly."""


def simulate_paired(live_rate: float, shadow_rate: float, discordant: float, *, runs: int = 1000,
                    max_labels: int = 20_000, every: int = 10, margin: float = DEFAULT_MARGIN,
                    alpha: float = DEFAULT_ALPHA, min_labels: int = DEFAULT_MIN_LABELS,
                    tau: float | None = None, seed: int = 0) -> Simulation:
    """Shadow experiments: a label grades both answers; a share ``discordant`` of rows has one right only."""
    live_only = round((discordant - (shadow_rate - live_rate)) / 2, DECIMALS)
    shadow_only = round(discordant - live_only, DECIMALS)
    if not (0 <= live_only <= live_rate and 0 <= shadow_only <= shadow_rate):
        raise ValueError(f"{discordant:g} discordant rows cannot give {live_rate:g} and {shadow_rate:g}")
    rng = np.random.default_rng(seed)
    shares = [live_only, shadow_only, 1 - discordant]
    counts = rng.multinomial(every, shares, size=(runs, max_labels // every))
    lost, won = (np.cumsum(counts[..., k], axis=1).astype(float) for k in (0, 1))
    n = np.broadcast_to(every * np.arange(1.0, max_labels // every + 1), lost.shape)
    diff = Moments(n, won - lost, won + lost, won - lost, n, n)  # differences in {-1, 0, 1}, own clusters
    spread = ACCURACY_BOUNDS[1] - ACCURACY_BOUNDS[0]
    evidence = Evidence(diff.total / n, floored_variance(diff, 2 * spread), n, spread, True)
    return _summarise(evidence, shadow_rate - live_rate, (live_rate, shadow_rate), margin, alpha, min_labels,
                      tau)


def simulate_clustered(rate: float = 0.95, *, users: int = 200, concentration: float = 5.0, runs: int = 300,
                       max_labels: int = 5_000, every: int = 10, margin: float = DEFAULT_MARGIN,
                       alpha: float = DEFAULT_ALPHA, min_labels: int = DEFAULT_MIN_LABELS,
                       tau: float | None = None, seed: int = 0) -> dict[str, Simulation]:
    """Equal arms of sticky users whose own accuracies differ widely, Beta(rate c, (1 - rate) c).

    Each label comes from one of ``users`` per arm at random, so a user's labels are correlated
    (intra-class correlation 1 / (c + 1)). The same data judged with the per-observation and with the
    cluster-robust variance.
    """
    rng = np.random.default_rng(seed)
    per_kind: dict[str, list[Moments]] = {PER_OBSERVATION: [], CLUSTER_ROBUST: []}
    peeks = slice(every - 1, None, every)
    for _ in range(2):
        accuracy = rng.beta(rate * concentration, (1 - rate) * concentration, size=(runs, users))
        who = rng.integers(0, users, size=(runs, max_labels))
        y = (rng.random(who.shape) < np.take_along_axis(accuracy, who, axis=1)).astype(float)
        n = np.broadcast_to(np.arange(1.0, max_labels + 1), who.shape)[:, peeks]
        total = np.cumsum(y, axis=1)[:, peeks]
        per_kind[PER_OBSERVATION].append(Moments(n, total, total, total, n, n))
        per_kind[CLUSTER_ROBUST].append(Moments(n, total, *(c[:, peeks] for c in _running_clusters(who, y))))
    return {kind: _summarise(_split(*stats), 0.0, (rate, rate), margin, alpha, min_labels, tau)
            for kind, stats in per_kind.items()}


def _running_clusters(who: NDArray[np.int64], y: NDArray[np.float64]) -> list[NDArray[np.float64]]:
    """Per row, over the rows so far: sum_g S_g^2, sum_g S_g n_g, sum_g n_g^2 and the clusters seen.

    Sorting each run by user (stable) turns a user's running sum and count into a cumulative sum from
    the user's first row; the change each row makes to the three sums then accumulates in arrival order.
    """
    order = np.argsort(who, axis=1, kind="stable")
    sorted_who, sorted_y = np.take_along_axis(who, order, axis=1), np.take_along_axis(y, order, axis=1)
    position = np.broadcast_to(np.arange(who.shape[1]), who.shape)
    first = np.maximum.accumulate(np.where(np.diff(sorted_who, axis=1, prepend=-1) != 0, position, 0), axis=1)
    running = np.cumsum(sorted_y, axis=1)
    after_sorted = [running - np.take_along_axis(running - sorted_y, first, axis=1), position - first + 1.0]
    sum_after, size_after = (np.empty_like(y) for _ in range(2))
    np.put_along_axis(sum_after, order, after_sorted[0], axis=1)
    np.put_along_axis(size_after, order, after_sorted[1], axis=1)
    sum_before, size_before = sum_after - y, size_after - 1
    steps = [sum_after**2 - sum_before**2, sum_after * size_after - sum_before * size_before,
             size_after**2 - size_before**2, (size_before == 0).astype(float)]
    return [np.cumsum(s, axis=1) for s in steps]


def _split(control: Moments, candidate: Moments) -> Evidence:
    """Candidate - control of simulated 0/1 outcomes, equal labels per arm."""
    spread = ACCURACY_BOUNDS[1] - ACCURACY_BOUNDS[0]
    return Evidence(candidate.total / candidate.n - control.total / control.n,
                    floored_variance(control, spread) + floored_variance(candidate, spread), candidate.n,
                    spread, True)


def _summarise(evidence: Evidence, truth: float, rates: tuple[float, float], margin: float, alpha: float,
               min_labels: int, tau: float | None) -> Simulation:
    """Verdicts at every peek of every run (rows: runs, columns: peeks), reduced to rates."""
    tau = default_tau(margin) if tau is None else tau
    n, estimate = evidence.n, evidence.estimate
    enough = n >= min_labels
    verdict = verdicts(estimate, evidence.excludes(-margin, tau, alpha), margin, enough)
    decided = verdict != CONTINUE
    first = decided.argmax(axis=1)
    reached = decided.any(axis=1)
    runs = np.arange(verdict.shape[0])
    first_verdict = np.where(reached, verdict[runs, first], CONTINUE)
    labels = n[runs, first][reached]
    ever = {ROLLBACK: verdict == ROLLBACK, PROMOTE: verdict == PROMOTE,
            "superior": enough & (estimate > 0) & evidence.excludes(0.0, tau, alpha),
            "miss": enough & evidence.excludes(truth, tau, alpha)}
    return Simulation(*rates, verdict.shape[0], int(n[0, -1]),
                      {v: float(np.mean(first_verdict == v)) for v in (PROMOTE, ROLLBACK, CONTINUE)},
                      float(np.median(labels)) if labels.size else None,
                      {k: float(v.any(axis=1).mean()) for k, v in ever.items()})


SCENARIOS: dict[str, tuple[float, float]] = {
    "equal": (0.95, 0.95),
    "at the margin": (0.95, 0.945),
    "3 points worse": (0.95, 0.92),
    "2 points better": (0.95, 0.97),
    "very accurate, at the margin": (0.999, 0.994),
}
"""True accuracies (control, candidate) of the documented split simulations."""
PAIRED_SCENARIOS: dict[str, tuple[float, float, float]] = {
    "shadow equal": (0.95, 0.95, 0.02),
    "shadow at the margin": (0.95, 0.945, 0.02),
    "shadow at the margin, disagreeing rarely": (0.95, 0.945, 0.005),
    "shadow 3 points worse": (0.95, 0.92, 0.04),
}
"""True accuracies (live, shadow) and share of discordant rows of the documented shadow simulations."""


def table(runs: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """The documented simulations, one row each: split, shadow (paired), then clustered users both ways."""
    rows = [{"scenario": name, **asdict(simulate(*rates, runs=runs, seed=seed))}
            for name, rates in SCENARIOS.items()]
    rows += [{"scenario": name, **asdict(simulate_paired(*rates, runs=runs, seed=seed))}
             for name, rates in PAIRED_SCENARIOS.items()]
    clustered = simulate_clustered(seed=seed)
    return rows + [{"scenario": f"clustered users, {kind} variance", **asdict(sim)}
                   for kind, sim in clustered.items()]


def main() -> None:
    """Print the simulation table of docs/experiments.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="simulated experiments per split scenario")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{METHOD['name']}: margin {DEFAULT_MARGIN}, alpha {DEFAULT_ALPHA}, "
          f"tau {default_tau(DEFAULT_MARGIN)}, min_labels {DEFAULT_MIN_LABELS}, a peek every 10 labels/arm")
    print("| scenario | control | candidate | runs | labels/arm | promote | rollback | none | median labels "
          "| ever rollback | ever superior | ever missed truth |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table(args.runs, args.seed):
        first, ever, median = r["first_verdict"], r["ever"], r["median_labels"]
        print(f"| {r['scenario']} | {r['control_rate']} | {r['candidate_rate']} | {r['runs']} "
              f"| {r['max_labels']} | {first[PROMOTE]:.3f} | {first[ROLLBACK]:.3f} | {first[CONTINUE]:.3f} "
              f"| {'-' if median is None else f'{median:.0f}'} | {ever[ROLLBACK]:.3f} "
              f"| {ever['superior']:.3f} | {ever['miss']:.3f} |")


if __name__ == "__main__":
    main()
