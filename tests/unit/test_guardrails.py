"""Issue 13: the decision's guardrails, through the ledger against a real SQLite experiment store.

A ``promote`` needs every guardrail to hold: one not known yet holds it back as ``continue``. The p95
latency ratio is not known until both variants have ``min_answers`` answers (the p95 of a handful is
their slowest); with one live variant (a rollout's last step) the sample ratio and the latency ratio are
still defined, so a good candidate there is promoted.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError

from common.config import Decision, Experiment, Guardrails, Monitoring, Store, Variant
from experiments.ledger import Ledger
from experiments.router import epoch

CLASSES = ["no", "yes"]
LABELS = 300
"""Labelled answers per variant: with every answer right, a margin of 0.1 is settled well before."""


def experiment(min_answers: int, control: float = 1.0, candidate: float = 1.0, **limits: Any) -> Experiment:
    return Experiment(salt="guardrails", variants=[Variant(name="control", model="m_a:v1", weight=control),
                                                    Variant(name="candidate", model="m_b:v1", weight=candidate)],
                      decision=Decision(margin=0.1, min_labels=30,
                                        guardrails=Guardrails(min_answers=min_answers, **limits)))


class World:
    """Answers logged and labelled in the store, and the served rows counted as a worker's metrics do."""

    def __init__(self, tmp_path: Path):
        self.ledger = Ledger(Store(log_predictions=False), f"sqlite:///{tmp_path / 'experiments.sqlite'}",
                             {"m": CLASSES}, Monitoring(check_every_s=0))
        self.registry = CollectorRegistry()
        self.requests = Counter("bundle_requests", "rows answered", ["model", "variant", "endpoint", "outcome",
                                                                      "pinned", "epoch"], registry=self.registry)
        self.served = 0

    def serve(self, e: Experiment, variant: str, rows: int, latency_ms: float, failed: int = 0) -> None:
        """``rows`` answers of ``variant`` routed under ``e``'s weights, each a user of its own, all right."""
        found = e.variant(variant)
        assert found is not None
        answers = []
        for _ in range(rows):
            answers.append({"prediction_id": f"p{self.served}", "served_at": time.time(), "model": "m",
                            "variant": variant, "model_tag": found.model, "pinned": False, "epoch": epoch(e),
                            "user_key": f"user-{self.served}", "endpoint": "predict", "label": "yes",
                            "label_index": 1, "top_probability": 0.9, "probabilities": [0.1, 0.9],
                            "latency_ms": latency_ms})
            self.served += 1
        self.ledger.store.insert_predictions(answers)
        assert {r["status"] for r in self.ledger.feedback([{"prediction_id": a["prediction_id"], "label": 1}
                                                           for a in answers])} == {"matched"}
        labels = {"model": "m", "variant": variant, "endpoint": "predict", "pinned": "false", "epoch": epoch(e)}
        self.requests.labels(outcome="ok", **labels).inc(rows)
        if failed:
            self.requests.labels(outcome="error", **labels).inc(failed)

    def decide(self, e: Experiment) -> dict[str, Any]:
        decision = self.ledger.decide("m", e, epoch(e), list(self.registry.collect()))
        return next(c for c in decision["candidates"] if c["variant"] == "candidate")


def test_a_promote_waits_for_every_guardrail_to_be_known(tmp_path: Path) -> None:
    world, e = World(tmp_path), experiment(min_answers=2 * LABELS)
    for variant in ("control", "candidate"):
        world.serve(e, variant, LABELS, latency_ms=1.0)
    waiting = world.decide(e)
    assert waiting["verdict"] == "continue", waiting
    assert waiting["interval"][0] > -0.1  # the interval alone would promote
    assert waiting["guardrails"]["p95_latency_ratio"]["state"] == "unknown"
    assert {g: waiting["guardrails"][g]["state"] for g in ("error_rate", "srm")} == {"error_rate": "holds",
                                                                                    "srm": "holds"}
    assert waiting["reason"] == ("Non-inferior, but promote once the p95 latency ratio is known: too few answers "
                                 "of candidate (300 of 600) and control (300 of 600).")
    for variant in ("control", "candidate"):
        world.serve(e, variant, LABELS, latency_ms=1.0)
    promoted = world.decide(e)
    assert promoted["verdict"] == "promote", promoted
    assert promoted["reason"].startswith("Non-inferior: ")
    assert {g["state"] for g in promoted["guardrails"].values()} == {"holds"}


def test_an_error_rate_not_counted_yet_holds_back_a_promote(tmp_path: Path) -> None:
    world, e = World(tmp_path), experiment(min_answers=1)
    for variant in ("control", "candidate"):
        world.serve(e, variant, LABELS, latency_ms=1.0)
    decision = world.ledger.decide("m", e, epoch(e), [])  # no worker's metrics: no rows counted
    candidate = next(c for c in decision["candidates"] if c["variant"] == "candidate")
    assert candidate["verdict"] == "continue"
    assert candidate["reason"].startswith("Non-inferior, but promote once the error rate is known: no rows of "
                                          "candidate counted yet")


def test_a_slow_handful_is_not_judged_and_a_slow_candidate_is_rolled_back(tmp_path: Path) -> None:
    world, e = World(tmp_path), experiment(min_answers=100)
    world.serve(e, "control", LABELS, latency_ms=1.0)
    world.serve(e, "candidate", 5, latency_ms=500.0)  # a first call, or a busy moment
    first = world.decide(e)["guardrails"]["p95_latency_ratio"]
    assert (first["state"], first["value"], first["reason"]) == ("unknown", None,
                                                                  "too few answers of candidate (5 of 100)")
    world.serve(e, "candidate", LABELS, latency_ms=1.0)
    settled = world.decide(e)
    assert settled["guardrails"]["p95_latency_ratio"]["state"] == "holds"  # the slow five are beyond the p95
    assert settled["verdict"] == "promote", settled
    world.serve(e, "candidate", LABELS, latency_ms=3.0)  # a real regression: half its answers 3x slower
    slower = world.decide(e)
    assert slower["guardrails"]["p95_latency_ratio"] | {"reason": ""} == {
        "state": "breached", "value": pytest.approx(3.0), "limit": 2.0, "reason": ""}
    assert slower["verdict"] == "rollback"
    assert slower["reason"].startswith("Guardrail breached: p95 latency ratio: candidate's p95 latency is 3.00x")


def test_at_the_last_rollout_step_the_only_live_candidate_can_be_promoted(tmp_path: Path) -> None:
    world, split = World(tmp_path), experiment(min_answers=400)
    world.serve(split, "control", LABELS, latency_ms=1.0)
    world.serve(split, "candidate", LABELS, latency_ms=1.0)
    assert world.decide(split)["guardrails"]["p95_latency_ratio"]["reason"] == (
        "too few answers of candidate (300 of 400) and control (300 of 400)")
    last = experiment(min_answers=400, control=0.0, candidate=2.0)  # the control has no more answers to come
    world.serve(last, "candidate", 150, latency_ms=1.0)
    promoted = world.decide(last)
    assert promoted["verdict"] == "promote", promoted
    assert promoted["guardrails"]["srm"] == {"value": None, "limit": 0.001, "state": "holds",
                                             "reason": "candidate is the only live variant and has every user"}
    assert promoted["guardrails"]["p95_latency_ratio"] | {"reason": ""} == {  # on the control's 300 past answers
        "value": pytest.approx(1.0), "limit": 2.0, "state": "holds", "reason": ""}
    world.serve(last, "control", 1, latency_ms=1.0)  # a user routed to a variant at weight 0
    leaked = world.decide(last)
    assert leaked["verdict"] == "rollback"
    assert leaked["reason"] == ("Guardrail breached: sample ratio: users reached control at weight 0 under the "
                                "weights in force.")


def test_min_answers_is_validated_like_the_other_limits() -> None:
    assert Guardrails().min_answers == 500
    with pytest.raises(ValidationError, match="min_answers"):
        Guardrails(min_answers=0)
    with pytest.raises(ValidationError, match="min_answer"):
        Guardrails.model_validate({"min_answer": 10})  # a misspelt key is refused, not ignored
