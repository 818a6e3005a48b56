"""The rollout controller's rounds against a real SQLite experiment store: traffic routed by the real
router, logged and labelled in the store, decided by the ledger. Only the live experiments are held in
memory (LiveExperiments as the controller sees it: a router and ``update``)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter

from common.config import Decision, Experiment, Guardrails, Monitoring, Rollout, Store, Variant
from common.errors import ConflictError, RequestError
from experiments.ledger import Ledger
from experiments.report import render
from experiments.rollout import RolloutController, share_of, weights_at
from experiments.router import Router
from harness.postgres import PostgresCluster

CLASSES = ["no", "yes"]
FAST = {"steps": [10, 50, 100], "min_labels": 30, "min_seconds": 0}
PERIOD_S = 1.0
"""The controllers' period: their lease lasts three."""


class Weights:
    """LiveExperiments as the controller sees it, in memory: a new router for every change."""

    def __init__(self, experiments: dict[str, Experiment]):
        self.experiments = dict(experiments)
        self.router = Router(self.experiments)
        self.changes = 0

    def current(self) -> Router:
        return self.router

    def update(self, model: str, weights: dict[str, float] | None, shadow: Any,
               on_change: Callable[[Experiment | None, Experiment], None] | None = None,
               source: str = "admin") -> Experiment:
        assert source == "rollout"
        before = self.experiments[model]
        variants = [v.model_dump() | {"weight": (weights or {}).get(v.name, v.weight)} for v in before.variants]
        after = Experiment.model_validate(before.model_dump() | {"variants": variants})
        self.experiments[model] = after
        self.router = Router(self.experiments)
        self.changes += 1
        if on_change is not None:
            on_change(before, after)
        return after


def experiment(candidate_weight: float = 0.0, **rollout: Any) -> Experiment:
    return Experiment(salt="rollout-test", variants=[Variant(name="control", model="m_a:v1", weight=1),
                                                      Variant(name="candidate", model="m_b:v1",
                                                              weight=candidate_weight)],
                      decision=Decision(margin=0.1, min_labels=30,
                                        guardrails=Guardrails(max_p95_latency_ratio=10)),
                      rollout=Rollout(**{**FAST, **rollout}))


class World:
    """A model's users, routed by the live router, answered right with each variant's accuracy, logged
    and labelled in the store."""

    def __init__(self, tmp_path: Path, accuracy: dict[str, float], holder: str = "worker-1", url: str | None = None,
                 **rollout: Any):
        self.ledger = Ledger(Store(log_predictions=False), url or f"sqlite:///{tmp_path / 'experiments.sqlite'}",
                             {"m": CLASSES}, Monitoring(check_every_s=0))
        self.live = Weights({"m": experiment(**rollout)})
        self.registry = CollectorRegistry()
        self.requests = Counter("bundle_requests", "rows answered", ["model", "variant", "endpoint", "outcome",
                                                                      "pinned", "epoch"], registry=self.registry)
        self.controller = RolloutController(self.ledger, self.live, PERIOD_S, holder=holder,
                                            samples=lambda: list(self.registry.collect()))
        self.accuracy = accuracy
        self.rng = np.random.default_rng(0)
        self.users = 0
        self.served = 0

    def traffic(self, users: int) -> dict[str, str]:
        """``users`` new users, one labelled answer each: the variant each got."""
        router, rows, got = self.live.router, [], {}
        for _ in range(users):
            user = f"user-{self.users}"
            self.users += 1
            variant = router.route("m", user).variant
            got[user] = variant.name
            truth = int(self.rng.integers(2))
            label = truth if self.rng.random() < self.accuracy[variant.name] else 1 - truth
            rows.append(({"prediction_id": f"p{self.served}", "served_at": time.time(), "model": "m",
                          "variant": variant.name, "model_tag": variant.model, "pinned": False,
                          "epoch": router.epoch("m"), "user_key": user, "endpoint": "predict",
                          "label": CLASSES[label], "label_index": label, "top_probability": 0.9,
                          "probabilities": [0.9, 0.1] if label == 0 else [0.1, 0.9], "latency_ms": 1.0}, truth))
            self.served += 1
            self.requests.labels(model="m", variant=variant.name, endpoint="predict", outcome="ok", pinned="false",
                                 epoch=router.epoch("m")).inc()
        self.ledger.store.insert_predictions([row for row, _ in rows])
        results = self.ledger.feedback([{"prediction_id": row["prediction_id"], "label": truth} for row, truth in rows])
        assert {r["status"] for r in results} == {"matched"}
        return got

    def weights(self) -> dict[str, float]:
        return {v.name: v.weight for v in self.live.router.experiment("m").variants}


def run(world: World, until: Callable[[dict[str, Any]], bool], users: int = 60, rounds: int = 40) -> dict[str, Any]:
    for _ in range(rounds):
        world.traffic(users)
        world.controller.round()
        status = world.controller.status("m")
        if until(status):
            return status
    raise AssertionError(f"not reached after {rounds} rounds: {world.controller.status('m')}")


def test_a_share_maps_to_a_weight_against_the_others() -> None:
    e = experiment(candidate_weight=0.0)
    assert weights_at(e, "candidate", 25) == {"control": 1.0, "candidate": pytest.approx(1 / 3)}
    assert share_of(Experiment.model_validate(e.model_dump() | {"variants": [
        {"name": "control", "model": "m_a:v1", "weight": 1.0},
        {"name": "candidate", "model": "m_b:v1", "weight": 1 / 3}]}), "candidate") == pytest.approx(25)
    assert weights_at(e, "candidate", 100) == {"control": 0.0, "candidate": 1.0}
    at_all = Experiment.model_validate(e.model_dump() | {"variants": [
        {"name": "control", "model": "m_a:v1", "weight": 0.0}, {"name": "candidate", "model": "m_b:v1", "weight": 1.0}]})
    assert weights_at(at_all, "candidate", 100) == {"control": 0.0, "candidate": 1.0}  # stays as it is


def test_users_on_the_candidate_stay_on_it_at_every_later_step() -> None:
    e = experiment()
    users = [f"u{i}" for i in range(20_000)]
    before: set[str] = set()
    for share in [1, 5, 25, 50, 100]:
        weights = weights_at(e, "candidate", share)
        variants = [v.model_dump() | {"weight": weights[v.name]} for v in e.variants]
        router = Router({"m": Experiment.model_validate(e.model_dump() | {"variants": variants})})
        on = {u for u in users if router.route("m", u).variant.name == "candidate"}
        assert before <= on, f"{len(before - on)} users left the candidate at {share}%"
        assert len(on) / len(users) == pytest.approx(share / 100, abs=0.01)
        before = on
    assert before == set(users)


def test_a_good_candidate_walks_every_step_and_is_promoted(tmp_path: Path) -> None:
    world = World(tmp_path, {"control": 0.95, "candidate": 0.95})
    status = world.controller.start("m", "candidate", {}, reason="test")
    assert (status["state"], status["step"], status["share"]) == ("running", 0, pytest.approx(10))
    assert world.controller.round() == {"m": "waiting for 30 more labelled predictions of candidate at this "
                                              "step (0 of 30)"}
    seen = [0]
    status = run(world, lambda s: (seen.append(s["step"]), s["state"] != "running")[1])
    assert status["state"] == "promoted", status
    assert sorted(set(seen)) == [0, 1, 2] and seen == sorted(seen)  # every step, in order
    assert world.weights() == {"control": 0.0, "candidate": 2.0}
    history = status["history"]
    assert [round(share_of_weights(h["new_weights"])) for h in history] == [10, 50, 100]
    assert "labels in" in history[1]["reason"] and "decision continue" in history[1]["reason"]
    assert world.ledger.history("m", 10)[0]["source"] == "rollout"
    assert status["reason"].startswith("promoted at step 3/3 (100%)")


def test_a_report_says_when_the_store_cannot_show_the_rollout(tmp_path: Path, postgres: PostgresCluster) -> None:
    world = World(tmp_path, {"control": 0.95, "candidate": 0.95},
                  url=postgres.create_database(f"rollout_{uuid.uuid4().hex[:12]}"))
    world.controller.start("m", "candidate", {})
    assert world.controller.summary("m")["rollout"]["state"] == "running"
    postgres.stop()
    try:
        unavailable = world.controller.summary("m")["rollout"]
    finally:
        postgres.start()
    assert set(unavailable) == {"error"} and "unavailable" in unavailable["error"], unavailable
    assert "rollout: unavailable (experiment store" in render(report_of(unavailable))
    assert world.controller.summary("m")["rollout"]["state"] == "running"


def report_of(rollout: dict[str, Any]) -> dict[str, Any]:
    """The smallest experiment report ``render`` accepts, with ``rollout``."""
    return {"model": "m", "epoch": "e", "variants": [], "p_value": None, "chi_square": None, "verdict": "ok",
            "rollout": rollout}


def share_of_weights(weights: dict[str, float]) -> float:
    return 100 * weights["candidate"] / sum(weights.values())


def test_a_degraded_candidate_is_rolled_back_at_its_first_step(tmp_path: Path) -> None:
    world = World(tmp_path, {"control": 0.95, "candidate": 0.3}, steps=[20, 50, 100])
    world.controller.start("m", "candidate", {})
    status = run(world, lambda s: s["state"] != "running")
    assert (status["state"], status["step"]) == ("rolled_back", 0)
    assert "Inferior" in status["reason"]
    assert world.weights() == {"control": 1.0, "candidate": 0.0}
    assert set(world.traffic(200).values()) == {"control"}


def test_a_breach_pauses_when_the_policy_says_so_and_resume_starts_the_step_over(tmp_path: Path) -> None:
    world = World(tmp_path, {"control": 0.95, "candidate": 0.3}, on_breach="pause")
    world.controller.start("m", "candidate", {"steps": [20, 100]})
    status = run(world, lambda s: s["state"] != "running")
    assert status["state"] == "paused" and world.weights()["candidate"] == pytest.approx(0.25)
    assert status["next"][0].startswith("resume (paused: paused at step 1/2 (20%): Inferior")
    assert world.controller.round() == {}  # a paused rollout is left alone
    resumed = world.controller.resume("m", "checked")
    assert (resumed["state"], resumed["step"], resumed["labels"]) == ("running", 0, 0)
    with pytest.raises(ConflictError):
        world.controller.resume("m")


def test_one_rollout_at_a_time_and_abort_takes_the_candidate_out(tmp_path: Path) -> None:
    world = World(tmp_path, {"control": 0.95, "candidate": 0.95})
    with pytest.raises(RequestError) as bad:
        world.controller.start("m", "candidate", {"steps": [50, 20]})
    assert bad.value.field == "policy"
    with pytest.raises(RequestError) as control:
        world.controller.start("m", "control", {})
    assert control.value.field == "candidate"
    world.controller.start("m", "candidate", {"min_seconds": 60})
    with pytest.raises(ConflictError):
        world.controller.start("m", "candidate", {})
    world.traffic(100)
    world.controller.round()
    waiting = world.controller.status("m")
    assert waiting["state"] == "running" and waiting["labels"] > 0
    assert any("more seconds at this step" in m for m in waiting["next"])
    aborted = world.controller.abort("m", "changed my mind")
    assert aborted["state"] == "aborted" and aborted["share"] == 0 and aborted["next"] is None
    assert world.weights() == {"control": 1.0, "candidate": 0.0}
    assert world.controller.start("m", "candidate", {})["state"] == "running"  # a finished one is replaced


def test_a_controller_that_dies_is_replaced_and_its_successor_continues_from_the_recorded_step(
        tmp_path: Path) -> None:
    world = World(tmp_path, {"control": 0.95, "candidate": 0.95}, steps=[10, 30, 60, 100])
    other = RolloutController(world.ledger, world.live, PERIOD_S, holder="worker-2", samples=list)
    world.controller.start("m", "candidate", {})
    run(world, lambda s: s["step"] == 1)
    assert other.round() is None  # worker-1 holds the lease
    assert world.controller.status("m")["controller"]["holder"] == "worker-1"
    changes = world.live.changes
    assert other.round(now=time.time() + 3 * PERIOD_S + 1) is not None  # worker-1 stopped: its lease expired
    assert world.live.changes == changes  # the step in force is kept, not applied again
    assert world.controller.round() is None
    world.controller = other
    status = run(world, lambda s: s["step"] == 2)
    assert status["controller"]["holder"] == "worker-2"
    assert [round(share_of_weights(h["new_weights"])) for h in status["history"]] == [10, 30, 60]
