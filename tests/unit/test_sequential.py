"""Issue 13: a decision that stays valid while you watch it. The statistics alone, by simulation.

Every simulation peeks after every 10 labels per arm up to 20,000, over 1,000 experiments, with the
seed of ``python -m experiments.sequential``: the rates and labels asserted here are the ones
docs/experiments.md reports.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from experiments import sequential as seq
from experiments.sequential import (
    CONTINUE,
    PROMOTE,
    ROLLBACK,
    Sample,
    compare,
    paired,
    simulate,
    simulate_paired,
)
from tests import ROOT

ALPHA = seq.DEFAULT_ALPHA
RUNS = 1000


@pytest.fixture(scope="module")
def equal() -> seq.Simulation:
    return simulate(0.95, 0.95, runs=RUNS)


def test_equal_accuracy_false_calls_stay_below_alpha(equal: seq.Simulation) -> None:
    assert equal.runs == RUNS and equal.max_labels == 20_000
    assert equal.ever[ROLLBACK] <= ALPHA  # rolled back a candidate as good as the control
    assert equal.ever["superior"] <= ALPHA  # called it better (lower > 0)
    assert equal.ever["miss"] <= ALPHA  # the interval excluded the truth at some peek


def test_equal_accuracy_is_promoted_once_the_interval_is_narrow_enough(equal: seq.Simulation) -> None:
    assert equal.first_verdict[PROMOTE] > 0.3 and equal.first_verdict[ROLLBACK] <= ALPHA
    assert 5_000 < equal.median_labels < 20_000  # measured: 11,160 labels per arm


@pytest.mark.parametrize("rates", [(0.95, 0.945), (0.999, 0.994)], ids=["accurate", "very-accurate"])
def test_a_candidate_at_the_margin_is_rarely_promoted(rates: tuple[float, float]) -> None:
    at_margin = simulate(*rates, runs=RUNS)
    assert at_margin.ever[PROMOTE] <= ALPHA / 2 and at_margin.ever["miss"] <= ALPHA


def test_three_points_worse_is_rolled_back() -> None:
    worse = simulate(0.95, 0.92, runs=RUNS)
    assert worse.first_verdict[ROLLBACK] == 1.0 and worse.ever["miss"] <= ALPHA
    assert worse.median_labels <= 2_500  # measured: 2,000 labels per arm


def test_two_points_better_is_promoted() -> None:
    better = simulate(0.95, 0.97, runs=RUNS)
    assert better.first_verdict[PROMOTE] == 1.0 and better.ever["miss"] <= ALPHA
    assert better.median_labels <= 1_500  # measured: 1,210 labels per arm


def test_shadow_equal_is_promoted_with_fewer_labels_than_a_split(equal: seq.Simulation) -> None:
    shadow = simulate_paired(0.95, 0.95, 0.02, runs=RUNS)
    assert shadow.first_verdict[PROMOTE] > 0.9 and shadow.ever[ROLLBACK] <= ALPHA
    assert shadow.ever["superior"] <= ALPHA and shadow.ever["miss"] <= ALPHA
    assert shadow.median_labels < equal.median_labels


@pytest.mark.parametrize("discordant", [0.005, 0.02])
def test_shadow_at_the_margin_is_rarely_promoted(discordant: float) -> None:
    """0.005: the shadow loses a row now and then and never wins one, where a plug-in variance fails."""
    shadow = simulate_paired(0.95, 0.945, discordant, runs=RUNS)
    assert shadow.ever[PROMOTE] <= ALPHA / 2 and shadow.ever["miss"] <= ALPHA


def test_shadow_three_points_worse_is_rolled_back_within_a_thousand_labels() -> None:
    shadow = simulate_paired(0.95, 0.92, 0.04, runs=RUNS)
    assert shadow.first_verdict[ROLLBACK] == 1.0 and shadow.ever["miss"] <= ALPHA
    assert shadow.median_labels <= 1_000  # measured: 680 labels


def test_clustered_users_need_the_cluster_robust_variance() -> None:
    by_kind = seq.simulate_clustered()
    naive, robust = by_kind[seq.PER_OBSERVATION], by_kind[seq.CLUSTER_ROBUST]
    assert naive.ever["miss"] > 2 * ALPHA and naive.ever["superior"] > ALPHA  # under-covers, false wins
    assert robust.ever["miss"] <= ALPHA
    assert robust.ever[ROLLBACK] <= ALPHA and robust.ever["superior"] <= ALPHA


def test_running_cluster_sums_match_the_direct_ones() -> None:
    rng = np.random.default_rng(4)
    who, y = rng.integers(0, 7, size=(3, 50)), rng.integers(0, 2, size=(3, 50)).astype(float)
    running = seq._running_clusters(who, y)
    for run in range(3):
        direct = seq.moments(y[run, :30], who[run, :30])
        assert [c[run, 29] for c in running] == pytest.approx(
            [direct.cluster_sq, direct.cluster_cross, direct.size_sq, direct.groups])


def test_cluster_robust_variance_is_the_sandwich_and_reduces_to_s2_over_n() -> None:
    rng = np.random.default_rng(5)
    y, users = rng.random(40), rng.integers(0, 6, size=40)
    sums = np.array([y[users == g].sum() for g in np.unique(users)])
    sizes = np.array([(users == g).sum() for g in np.unique(users)])
    g = sums.size
    sandwich = g / (g - 1) * ((sums - sizes * y.mean()) ** 2).sum() / y.size**2
    assert seq.variance_of_mean(seq.moments(y, users)) == pytest.approx(sandwich)
    assert seq.variance_of_mean(seq.moments(y)) == pytest.approx(y.var(ddof=1) / y.size)
    assert seq.variance_of_mean(seq.moments(y, np.arange(40))) == pytest.approx(y.var(ddof=1) / y.size)


def test_compare_reports_interval_counts_kind_and_method() -> None:
    rng = np.random.default_rng(6)
    control, candidate = rng.random(3000) < 0.95, rng.random(2500) < 0.92
    result = compare(Sample(control), Sample(candidate), margin=0.005, alpha=0.05, min_labels=200)
    assert result.estimate == pytest.approx(candidate.mean() - control.mean())
    assert result.lower < result.estimate < result.upper
    assert result.n == {"control": 3000, "candidate": 2500} and result.variance == seq.PER_OBSERVATION
    assert result.verdict == ROLLBACK and result.upper < -0.005 and result.labels_needed == 0
    out = result.as_dict()
    json.dumps(out, allow_nan=False)
    assert out["method"]["reference"].startswith("R. Johari")
    assert out["method"]["parameters"] == {"margin": 0.005, "alpha": 0.05, "tau": 0.01, "min_labels": 200}
    assert "Inferior" in out["reason"]


def test_compare_waits_for_min_labels_and_says_how_many_more() -> None:
    result = compare(Sample(np.ones(50)), Sample(np.zeros(50)), min_labels=200)
    assert result.verdict == CONTINUE and result.labels_needed >= 150 and "200 labels" in result.reason


def test_no_variation_yet_does_not_mean_certainty() -> None:
    early = compare(Sample(np.ones(300)), Sample(np.ones(300)))
    assert early.verdict == CONTINUE and early.lower < -seq.DEFAULT_MARGIN
    assert compare(Sample(np.ones(5000)), Sample(np.ones(5000))).verdict == PROMOTE


def test_labels_needed_is_where_the_interval_would_clear_the_margin() -> None:
    control, candidate = np.r_[np.ones(950), np.zeros(50)], np.r_[np.ones(960), np.zeros(40)]
    result = compare(Sample(control), Sample(candidate))
    assert result.verdict == CONTINUE and result.labels_needed > 0
    per_label = max(control.var(ddof=1) + candidate.var(ddof=1),  # both arms' variance per label, kept
                    float(seq.least_variance(-result.margin, 1.0, True)))

    def width(more: int) -> float:
        return float(seq.half_width(per_label / (1000 + more), result.tau, result.alpha))

    assert width(result.labels_needed) <= result.estimate + result.margin < width(result.labels_needed - 1)


@pytest.mark.parametrize("estimate, plugin", [(-0.002, 2e-6), (0.01, 1e-4), (-0.03, 5e-5)])
def test_interval_ends_are_where_the_point_test_turns(estimate: float, plugin: float) -> None:
    evidence = seq.Evidence(estimate, plugin, 2000, 1.0, True)
    lower, upper = evidence.interval(0.01, 0.05)
    step = 1e-6
    assert evidence.excludes(np.array([lower - step, upper + step]), 0.01, 0.05).all()
    assert not evidence.excludes(np.array([lower + step, estimate, upper - step]), 0.01, 0.05).any()
    below, above = estimate - lower, upper - estimate
    away, toward = (below, above) if estimate < 0 else (above, below)
    assert away >= toward  # the least variance grows with |theta|: the side away from 0 is the longer


def test_clustered_compare_says_cluster_robust_and_is_wider() -> None:
    rng = np.random.default_rng(8)
    users = np.repeat(np.arange(100), 30)
    control = rng.random(3000) < np.repeat(rng.beta(4.75, 0.25, 100), 30)
    candidate = rng.random(3000) < np.repeat(rng.beta(4.75, 0.25, 100), 30)
    naive = compare(Sample(control), Sample(candidate))
    robust = compare(Sample(control, users), Sample(candidate, users + 1000))
    assert robust.variance == seq.CLUSTER_ROBUST and naive.variance == seq.PER_OBSERVATION
    assert robust.upper - robust.lower > 1.5 * (naive.upper - naive.lower)
    assert compare(Sample(control, users), Sample(candidate)).variance == seq.MIXED


def test_paired_counts_discordant_pairs_and_decides_from_them() -> None:
    rng = np.random.default_rng(9)
    live = rng.random(4000) < 0.95
    same = paired(live, live)
    assert same.estimate == 0 and same.discordant == {"live_only": 0, "shadow_only": 0}
    assert same.verdict == PROMOTE and same.n == {"paired": 4000}
    worse = live & (rng.random(4000) > 0.03)  # the shadow misses 3% of what live gets right
    judged = paired(live, worse, clusters=np.arange(4000) % 500)
    assert judged.discordant["shadow_only"] == 0 and judged.discordant["live_only"] == (live & ~worse).sum()
    assert judged.verdict == ROLLBACK and judged.variance == seq.CLUSTER_ROBUST
    assert json.dumps(judged.as_dict(), allow_nan=False)


def test_paired_needs_fewer_labels_than_a_split() -> None:
    rng = np.random.default_rng(10)
    live = rng.random(1500) < 0.95
    shadow = np.where(rng.random(1500) < 0.02, ~live, live)  # 2% of rows flip, in both directions
    split = compare(Sample(live), Sample(shadow))
    pair = paired(live, shadow)
    assert pair.upper - pair.lower < (split.upper - split.lower) / 2


def test_rewards_outside_zero_one_widen_the_bounds() -> None:
    def width(reward: float) -> float:
        result = compare(Sample(np.full(400, reward)), Sample(np.full(400, reward)), margin=0.5)
        return result.upper - result.lower

    assert width(2.5) > 2 * width(0.5) > 0  # graded rewards: only the variance floor, 2.5 times as wide


def test_two_valued_outcomes_use_the_least_variance_at_each_difference() -> None:
    """All 400 right in both arms: the plug-in variance is 0, yet a difference of -margin would need at
    least a margin's share of rows wrong; the interval still contains it."""
    result = compare(Sample(np.ones(400)), Sample(np.ones(400)), margin=0.01)
    assert result.estimate == 0 and result.lower < -0.01 and result.verdict == CONTINUE
    assert compare(Sample(np.ones(4000)), Sample(np.ones(4000)), margin=0.01).verdict == PROMOTE
    assert float(seq.least_variance(-0.01, 1.0, True)) == pytest.approx(0.01 * 0.99)
    assert float(seq.least_variance(-0.01, 1.0, False)) == 0


def test_empty_arms_continue_without_numbers() -> None:
    out = compare(Sample([]), Sample([])).as_dict()
    assert out["verdict"] == CONTINUE and out["estimate"] is None and out["labels_needed"] is None
    json.dumps(out, allow_nan=False)


def test_cli_prints_the_table() -> None:
    done = subprocess.run([sys.executable, "-m", "experiments.sequential", "--runs", "50"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    assert "| 3 points worse | 0.95 | 0.92 |" in done.stdout and "cluster-robust" in done.stdout


@pytest.mark.parametrize("control, candidate", [([1.0] * 5, [1.0] * 3), ([1.0, 0.0], [1.0]), ([], [1.0]),
                                                ([0.0] * 10, [1.0] * 10)])
def test_a_handful_of_labels_gives_an_interval_not_an_error(control: list[float], candidate: list[float]) -> None:
    """The first labels of a live experiment: one user, no variation, or an empty arm."""
    result = seq.compare(seq.Sample(np.array(control)), seq.Sample(np.array(candidate)),
                                margin=0.05, alpha=0.05, min_labels=1)
    assert result.lower is None or -1.0 <= result.lower <= result.upper <= 1.0
    assert result.verdict in (seq.CONTINUE, seq.PROMOTE)


def test_the_sample_ratio_p_value_stays_valid_however_often_it_is_read() -> None:
    """Fair 80/20 splits read every 10 units up to 2,000: never flagged at 0.001, where the chi-square
    read as often is (its level holds only for one look); a 70/30 split is flagged within 1,000 units."""
    from scipy.stats import chisquare

    rng = np.random.default_rng(7)
    shares, peeks = np.array([0.8, 0.2]), range(10, 2001, 10)
    flagged = chi_flagged = 0
    for _ in range(100):
        candidate = np.cumsum(rng.random(2000) < shares[1])
        counts = [np.array([t - candidate[t - 1], candidate[t - 1]]) for t in peeks]
        flagged += any(seq.srm_p_value(n, shares) < 0.001 for n in counts)
        chi_flagged += any(chisquare(n, shares * n.sum()).pvalue < 0.001 for n in counts[9:])
    assert flagged == 0 and chi_flagged > 0
    skewed = np.cumsum(rng.random(1000) < 0.3)
    assert seq.srm_p_value([1000 - skewed[-1], skewed[-1]], shares) < 0.001
    assert seq.srm_p_value([0, 0], shares) == 1.0 and seq.srm_p_value([5000, 0], shares) == 0.0
