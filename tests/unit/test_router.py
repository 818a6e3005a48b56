"""Issue: A/B experiments. The router on 100,000 synthetic users: shares, stickiness, ramps, restarts."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from common.config import Experiment
from experiments.router import Router
from tests import ROOT

USERS = [f"user-{i}" for i in range(100_000)]


def experiment(**weights: float) -> Experiment:
    return Experiment(salt="test-salt", variants=[{"name": n, "model": f"m_{n}:v1", "weight": w}
                                                  for n, w in weights.items()])


def assignment(router: Router) -> np.ndarray:
    return np.array([router.route("m", u).variant.name for u in USERS])


@pytest.mark.parametrize("weights", [{"a": 1, "b": 1}, {"a": 70, "b": 30}, {"a": 0.2, "b": 0.5, "c": 0.3},
                                     {"a": 1, "b": 0, "c": 3}, {"a": 99, "b": 1}])
def test_shares_within_one_point_of_weights(weights: dict[str, float]) -> None:
    names = assignment(Router({"m": experiment(**weights)}))
    total = sum(weights.values())
    for name, weight in weights.items():
        assert abs((names == name).mean() - weight / total) < 0.01, name
    assert "b" not in names or weights["b"] > 0


def test_sticky_for_every_user() -> None:
    router = Router({"m": experiment(a=1, b=2)})
    assert (assignment(router) == assignment(router)).all()


def test_random_split_without_user_follows_weights() -> None:
    router = Router({"m": experiment(a=1, b=3)})
    names = np.array([router.route("m").variant.name for _ in range(40_000)])
    assert abs((names == "b").mean() - 0.75) < 0.01


def test_ramp_only_moves_users_into_the_raised_variant() -> None:
    before = None
    for b_weight in (0, 5, 10, 25, 50, 100, 400):
        after = assignment(Router({"m": experiment(a=50, b=b_weight, c=50)}))
        if before is not None:
            moved = before != after
            assert (after[moved] == "b").all(), "a raised weight may only pull users into that variant"
            assert (after[before == "b"] == "b").all(), "nobody leaves the variant being ramped up"
        before = after
    assert (before == "b").mean() > 0.75


def test_lowering_a_weight_only_moves_users_out_of_it() -> None:
    before = assignment(Router({"m": experiment(a=1, b=1, c=1)}))
    after = assignment(Router({"m": experiment(a=1, b=0.25, c=1)}))
    moved = before != after
    assert (before[moved] == "b").all()


def test_same_assignment_after_restart_in_another_process() -> None:
    here = assignment(Router({"m": experiment(a=1, b=1, c=2)}))[:2000]
    code = ("from tests.unit.test_router import Router, experiment, USERS;"
            "r = Router({'m': experiment(a=1, b=1, c=2)});"
            "print(','.join(r.route('m', u).variant.name for u in USERS[:2000]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip().split(",") == here.tolist()


def test_pinned_variant_bypasses_the_split() -> None:
    router = Router({"m": experiment(a=1, b=0)})
    route = router.route("m", "alice", variant="b")
    assert route.variant.name == "b" and route.pinned
