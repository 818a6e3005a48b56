"""Progressive rollout end to end on a real server (2 workers), with feedback from the true labels.

The policy is fast (steps of seconds, a few dozen labels) and the decision's margin wide, so a
test-sized number of labels settles it: wine's ONNX twin walks every step and is promoted, wine's
degraded model (trained on shuffled labels) is rolled back at its first step, and killing the worker
that holds the controller's lease hands the rollout to another, which continues from the recorded step.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import yaml

from common import datasets
from experiments.report import render
from harness.server import ServerProcess as Server
from tests import ROOT
from tests.degraded import DEGRADED, degraded_home
from tests.e2e.conftest import ADMIN_TOKEN, FEEDBACK_TOKEN, TOKENS
from tests.e2e.test_decisions import wait_for, wait_logged

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FEEDBACK = {"Authorization": f"Bearer {FEEDBACK_TOKEN}"}
WAIT_S = 90  # deadline for a rollout to finish or move, never a measured duration
DECISION = {"margin": 0.1, "min_labels": 30, "guardrails": {"max_p95_latency_ratio": 50}}
"""Ten accuracy points: twins answer as their sources do, so a few dozen labels settle it."""


def experiments() -> dict[str, Any]:
    def variants(*entries: tuple[str, str, float]) -> list[dict[str, Any]]:
        return [{"name": n, "model": m, "weight": w} for n, m, w in entries]
    return {
        "wine": {"salt": "wine-rollout", "decision": DECISION,
                 "rollout": {"steps": [20, 50, 100], "min_labels": 30, "min_seconds": 1},
                 "variants": variants(("sklearn-v1", "wine_sklearn:v1", 1), ("onnx-v1", "wine_sklearn_onnx:v1", 0),
                                      ("shuffled", DEGRADED, 0))},
        "cancer": {"salt": "cancer-rollout", "decision": DECISION,
                   "rollout": {"steps": [10, 20, 30, 40, 50, 100], "min_labels": 10, "min_seconds": 1},
                   "variants": variants(("tf-v1", "cancer_tf:v1", 1), ("onnx-v1", "cancer_tf_onnx:v1", 0))}}


@pytest.fixture(scope="module")
def server(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("rollout")
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["experiments"] = experiments()
    config.setdefault("repository", {})["controller_every_s"] = 0.3
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "BENTOML_HOME": str(degraded_home(model_store, folder)),
           "BUNDLE_CONFIG": str(folder / "config.yaml"), **TOKENS}
    running = Server("service:Bundle", ROOT, env, folder)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


class Traffic:
    """New users answered by the split and labelled with the truth, a batch at a time."""

    def __init__(self, model: str):
        self.model = model
        self.data = datasets.load(model)
        self.users = 0

    def send(self, client: httpx.Client, rows: int = 100) -> None:
        index = np.arange(self.users, self.users + rows)
        self.users += rows
        instances = [{"model": self.model, "inputs": self.data.x_test[i % len(self.data.x_test)].tolist(),
                      "user_id": f"{self.model}-user-{i}"} for i in index]
        answered = client.post("/predict", json={"instances": instances})
        if answered.status_code != 200:  # a worker killed mid-request: its users come again later
            return
        answers = answered.json()
        wait_logged(client, [a["prediction_id"] for a in answers])
        truth = [self.data.classes[int(self.data.y_test[i % len(self.data.y_test)])] for i in index]
        items = [{"prediction_id": a["prediction_id"], "label": label} for a, label in zip(answers, truth)]
        assert client.post("/feedback", json={"feedback": items}, headers=FEEDBACK).status_code == 200


def drive(client: httpx.Client, traffic: Traffic, until: Any) -> list[dict[str, Any]]:
    """Traffic and labels until ``until(status)``: every status seen."""
    seen = []
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            traffic.send(client)
            status = client.get(f"/experiments/{traffic.model}/rollout")
        except httpx.TransportError:  # the connection went to a worker that was killed
            continue
        assert status.status_code == 200, status.text
        seen.append(status.json())
        if until(seen[-1]):
            return seen
        assert time.monotonic() < deadline, f"not reached after {WAIT_S} s: {seen[-1]}"


def weights(client: httpx.Client, model: str) -> dict[str, float]:
    return {v["name"]: v["weight"] for v in client.get("/experiments").json()["experiments"][model]["variants"]}


def shares(status: dict[str, Any], candidate: str) -> list[int]:
    return [round(100 * h["new_weights"][candidate] / sum(h["new_weights"].values())) for h in status["history"]]


def test_a_degraded_candidate_is_rolled_back_at_its_first_step(client: httpx.Client) -> None:
    assert client.post("/experiments/wine/rollout", json={"candidate": "shuffled"}).status_code == 401
    started = client.post("/experiments/wine/rollout", json={"candidate": "shuffled"}, headers=ADMIN)
    assert started.status_code == 200, started.text
    assert (started.json()["state"], started.json()["share"]) == ("running", pytest.approx(20))
    again = client.post("/experiments/wine/rollout", json={"candidate": "onnx-v1"}, headers=ADMIN)
    assert again.status_code == 409 and again.json()["field"] == "model", again.text
    last = drive(client, Traffic("wine"), lambda s: s["state"] != "running")[-1]
    assert (last["state"], last["step"]) == ("rolled_back", 0), last
    assert last["reason"].startswith("rolled back at step 1/3 (20%)")
    wait_for(lambda: weights(client, "wine") == {"sklearn-v1": 1.0, "onnx-v1": 0.0, "shuffled": 0.0},
             "rolled back in every worker")
    assert shares(client.get("/experiments/wine/rollout").json(), "shuffled") == [20, 0]


def test_a_good_candidate_walks_every_step_and_is_promoted(client: httpx.Client) -> None:
    bad = client.post("/experiments/wine/rollout", json={"candidate": "onnx-v1", "policy": {"steps": [50, 10]}},
                      headers=ADMIN)
    assert bad.status_code == 400 and bad.json()["field"] == "policy", bad.text
    started = client.post("/experiments/wine/rollout", json={"candidate": "onnx-v1"}, headers=ADMIN)
    assert started.status_code == 200, started.text
    seen = drive(client, Traffic("wine"), lambda s: s["state"] != "running")
    assert seen[-1]["state"] == "promoted", seen[-1]
    steps = [s["step"] for s in seen]
    assert steps == sorted(steps) and set(steps) == {0, 1, 2}
    assert any(s["next"] and "more labelled predictions of onnx-v1" in s["next"][0] for s in seen)
    assert shares(seen[-1], "onnx-v1") == [20, 50, 100]
    assert weights(client, "wine") == {"sklearn-v1": 0.0, "onnx-v1": 2.0, "shuffled": 0.0}
    report = client.get("/experiments/wine/report").json()
    assert report["rollout"]["state"] == "promoted", report
    assert "rollout of onnx-v1: promoted at step 3/3 (100%)" in render(report)
    changes = client.get("/experiments/wine/history").json()["changes"]
    assert changes[0]["source"] == "rollout" and "decision" in changes[0]["reason"]


def test_killing_the_controller_hands_the_rollout_to_another_worker(client: httpx.Client, server: Server) -> None:
    traffic = Traffic("cancer")
    assert client.post("/experiments/cancer/rollout", json={"candidate": "onnx-v1"}, headers=ADMIN).status_code == 200
    moved = drive(client, traffic, lambda s: s["step"] >= 1)[-1]
    holder = moved["controller"]["holder"]
    pid = int(holder.rsplit("/", 1)[1])
    assert pid in {p.pid for p in server.processes()[1:]}, holder
    os.kill(pid, signal.SIGKILL)
    after = drive(client, traffic, lambda s: s["controller"]["holder"] != holder and s["step"] > moved["step"])[-1]
    assert after["state"] == "running", after
    recorded = shares(after, "onnx-v1")
    assert recorded == sorted(set(recorded)), recorded  # no step applied twice, none started over
    assert recorded[:after["step"] + 1] == [10, 20, 30, 40, 50, 100][:after["step"] + 1]
    assert client.post("/experiments/cancer/rollout/abort", json={"reason": "test over"},
                       headers=ADMIN).json()["state"] == "aborted"
