"""Issue 13: experiments that decide, end to end on a real server (2 workers), on both stores.

Each store gets a server of its own, over a model store that adds a deliberately degraded candidate:
wine's v1 pipeline trained on shuffled labels. The wine experiment pits the control (sklearn v1)
against its ONNX twin (as good) and that degraded model, with a margin wide enough for a test-sized
number of labels; the replay demo must then promote the twin and roll back the degraded model. The
cancer experiment's latency guardrail is set so that it must breach, once both variants have answered
enough to judge it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import yaml

from common import datasets
from harness.server import ServerProcess as Server
from tests import ROOT
from tests.degraded import DEGRADED, degraded_home
from tests.e2e.conftest import ADMIN_TOKEN, FEEDBACK_TOKEN, TOKENS
from harness.postgres import PostgresCluster

pytestmark = pytest.mark.slow

MARGIN = 0.05
"""Five accuracy points: the ONNX twin answers as its source does, so a test-sized sample settles it."""
MIN_LABELS = 60
MIN_ANSWERS = 50
"""Answers per variant before cancer's p95 latency ratio is judged (the default is 500)."""
FRESH_READS = 12
"""Consecutive reads, each on a new connection, that must all show a weight change."""
WAIT_S = 60  # deadline for an outcome every worker must show, never a measured duration
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FEEDBACK = {"Authorization": f"Bearer {FEEDBACK_TOKEN}"}


def wait_for(check: Any, what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while not (result := check()):
        assert time.monotonic() < deadline, f"still not {what} after {WAIT_S} s"
        time.sleep(0.1)
    return result


@pytest.fixture(scope="module")
def home(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return degraded_home(model_store, tmp_path_factory.mktemp("decisions"))


def experiment_config(folder: Path) -> Path:
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["experiments"]["wine"] = {
        "salt": "wine-decisions",
        "variants": [{"name": "sklearn-v1", "model": "wine_sklearn:v1", "weight": 1},
                     {"name": "onnx-v2", "model": "wine_sklearn_onnx:v2", "weight": 1},
                     {"name": "shuffled", "model": DEGRADED, "weight": 1}],
        "decision": {"margin": MARGIN, "min_labels": MIN_LABELS}}
    config["experiments"]["cancer"]["decision"] = {  # no candidate is a thousandth of its control's latency
        "guardrails": {"max_p95_latency_ratio": 0.001, "min_answers": MIN_ANSWERS}}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Deployment:
    """A server over the degraded home, restartable with the same configuration and store."""

    def __init__(self, home: Path, folder: Path, store_url: str | None):
        self.folder = folder
        self.env = {**os.environ, "BENTOML_HOME": str(home),
                    "BUNDLE_CONFIG": str(experiment_config(folder)), **TOKENS}
        if store_url:
            self.env["BUNDLE_STORE_URL"] = store_url
        self.server = self.start()

    def start(self) -> Server:
        return Server("service:Bundle", ROOT, self.env, self.folder)

    def restart(self) -> None:
        self.server.stop()
        self.server = self.start()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.server.url, timeout=60)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def deployment(request: pytest.FixtureRequest, home: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployment, PostgresCluster | None]]:
    """SQLite: the default file beside the model store. PostgreSQL: a cluster of this module's own (the
    last test stops it)."""
    cluster = None
    if request.param == "postgresql":
        cluster = PostgresCluster()
        cluster.start()
    running = Deployment(home, tmp_path_factory.mktemp(request.param), cluster and cluster.url)
    yield running, cluster
    running.server.stop()
    if cluster is not None:
        cluster.remove()


def wait_logged(client: httpx.Client, ids: list[str]) -> None:
    """Until every id is in the store (the log writes in batches, per worker): an unknown class is
    ``invalid`` for a logged id and ``unknown_id`` for one not yet written, and changes nothing."""
    probe = [{"prediction_id": i, "label": "no such class"} for i in ids]
    wait_for(lambda: all(r["status"] == "invalid" for r in client.post(
        "/feedback", json={"feedback": probe}, headers=FEEDBACK).json()["results"]), "logged")


def predict(client: httpx.Client, model: str, rows: np.ndarray, users: list[str]) -> list[dict[str, Any]]:
    instances = [{"model": model, "inputs": row.tolist(), "user_id": user} for row, user in zip(rows, users)]
    response = client.post("/predict", json={"instances": instances})
    assert response.status_code == 200, response.text
    return response.json()


def test_every_answer_has_an_id_and_feedback_joins_it(deployment: tuple[Deployment, Any]) -> None:
    running, _ = deployment
    data = datasets.load("cancer")
    with running.client() as client:
        single = client.post("/predict", json={"instances": [{"model": "cancer", "inputs": data.x_test[0].tolist()}]})
        assert single.headers["X-Prediction-Id"] == single.json()[0]["prediction_id"]
        assert "X-Prediction-Id" not in client.post("/predict", json={"instances": [
            {"model": "cancer", "inputs": row} for row in data.x_test[:2].tolist()]}).headers
        one = client.post("/predict_ndarray", json={"model": "cancer", "inputs": [data.x_test[0].tolist()],
                                                    "ids": ["order-1"]})
        assert one.status_code == 200 and one.json()["ids"] == ["order-1"]
        assert one.headers["X-Prediction-Id"] == one.json()["prediction_ids"][0]
        oip = client.post("/v2/models/cancer/infer", json={"inputs": [
            {"name": "input", "shape": [2, 30], "datatype": "FP32", "data": data.x_test[:2].ravel().tolist()}]})
        tfs = client.post("/v1/models/cancer:predict", json={"instances": data.x_test[:1].tolist()})
        ids = [*one.json()["prediction_ids"], *oip.json()["parameters"]["prediction_ids"],
               *tfs.json()["prediction_ids"]]
        assert len(set(ids)) == 4 and tfs.headers["X-Prediction-Id"] == ids[-1]
        truth = data.classes[int(data.y_test[0])]

        assert client.post("/feedback", json={"feedback": [{"id": "order-1", "label": truth}]}).status_code == 401
        items = [{"id": "order-1", "label": truth}, {"prediction_id": ids[1], "label": int(data.y_test[0])},
                 {"prediction_id": ids[2], "reward": 0.5}, {"prediction_id": "never-served", "label": truth},
                 {"prediction_id": ids[3], "label": "no such class"}, {"prediction_id": ids[3], "label": [1]}]
        wait_logged(client, ids)
        first = client.post("/feedback", json={"feedback": items}, headers=FEEDBACK).json()
        assert [r["status"] for r in first["results"]] == ["matched", "matched", "matched", "unknown_id", "invalid",
                                                           "invalid"]
        assert "malignant" in first["results"][4]["reason"]  # names the classes it expected
        again = client.post("/feedback", json={"feedback": items[:2]}, headers=FEEDBACK).json()
        assert [r["status"] for r in again["results"]] == ["duplicate", "duplicate"]
        other = data.classes[1 - int(data.y_test[0])]
        corrected = client.post("/feedback", json={"feedback": [{"id": "order-1", "label": other}]},
                                headers=FEEDBACK).json()
        assert (corrected["results"][0]["status"], corrected["results"][0].get("correction")) == ("matched", True)


def test_the_report_accuracy_is_what_the_client_computes(deployment: tuple[Deployment, Any]) -> None:
    running, _ = deployment
    data = datasets.load("digits")
    rows, truth = data.x_test[:300], data.y_test[:300]
    with running.client() as client:
        answers = predict(client, "digits", rows, [f"reader-{i % 50}" for i in range(len(rows))])
        mine: dict[str, list[bool]] = {}
        for answer, label in zip(answers, truth):
            mine.setdefault(answer["variant"], []).append(answer["label"] == data.classes[label])
        items = [{"prediction_id": a["prediction_id"], "label": data.classes[label]} for a, label in zip(answers, truth)]
        wait_logged(client, [a["prediction_id"] for a in answers])
        result = client.post("/feedback", json={"feedback": items}, headers=FEEDBACK).json()
        assert result["counts"] == {"matched": len(items)}
        report = client.get("/experiments/digits/report").json()["outcomes"]["variants"]
    for variant, right in mine.items():
        assert report[variant]["accuracy"]["value"] == pytest.approx(np.mean(right))
        assert report[variant]["accuracy"]["n"] == len(right)
        assert report[variant]["accuracy"]["low"] <= np.mean(right) <= report[variant]["accuracy"]["high"]
        assert sum(map(sum, report[variant]["confusion"]["matrix"])) == len(right)


def test_the_replay_demo_promotes_the_twin_and_rolls_back_the_degraded_model(
        deployment: tuple[Deployment, Any]) -> None:
    running, _ = deployment
    done = subprocess.run([sys.executable, "-m", "experiments.replay", "wine", "--url", running.server.url,
                           "--feedback-token", FEEDBACK_TOKEN, "--delay", "0.5", "--every", "2",
                           "--users", "400", "--max-seconds", "300"],
                          cwd=ROOT, env=running.env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^onnx-v2: promote: Non-inferior", done.stdout, re.MULTILINE), done.stdout
    assert re.search(r"^shuffled: rollback: ", done.stdout, re.MULTILINE), done.stdout
    with running.client() as client:
        decision = client.get("/experiments/wine/decision").json()
    verdicts = {c["variant"]: c for c in decision["candidates"]}
    assert verdicts["onnx-v2"]["verdict"] == "promote" and verdicts["shuffled"]["verdict"] == "rollback"
    assert verdicts["shuffled"]["reason"].startswith("Inferior: "), verdicts["shuffled"]  # not a guardrail
    assert {g["state"] for g in verdicts["onnx-v2"]["guardrails"].values()} == {"holds"}
    assert verdicts["onnx-v2"]["interval"][0] > -MARGIN
    assert verdicts["onnx-v2"]["variance"] == "cluster-robust"
    assert decision["method"]["reference"].startswith("R. Johari")
    assert decision["labels"]["shuffled"]["labelled"] >= MIN_LABELS


def test_a_breached_guardrail_rolls_back_whatever_the_accuracy(deployment: tuple[Deployment, Any]) -> None:
    running, _ = deployment
    data = datasets.load("cancer")
    users = [f"patient-{i}" for i in range(4 * MIN_ANSWERS)]  # split 1:1: each variant gets enough
    rows = data.x_test[np.arange(len(users)) % len(data.x_test)]
    with running.client() as client:
        answers = predict(client, "cancer", rows, users)
        wait_logged(client, [a["prediction_id"] for a in answers])
        decision = client.get("/experiments/cancer/decision").json()
    candidate = decision["candidates"][0]
    assert min(decision["labels"][v]["served"] for v in ("tf-v1", "onnx-int8-v2")) >= MIN_ANSWERS
    assert candidate["guardrails"]["p95_latency_ratio"]["state"] == "breached", candidate
    assert candidate["verdict"] == "rollback"
    assert candidate["reason"].startswith("Guardrail breached: p95 latency ratio: onnx-int8-v2's p95 latency is "), \
        candidate["reason"]
    assert candidate["reason"].endswith("limit 0.001x."), candidate["reason"]


class EveryWorker:
    """Whether every worker of the server has taken up a weight change: reads on new connections, so
    each goes to whichever worker accepts it, until ``FRESH_READS`` in a row show the weights expected
    and every worker was among those that showed them (a worker that has them keeps them). Each read
    learns its worker from ``GET /admin/models`` on the same connection."""

    def __init__(self, running: Deployment, model: str, expected: dict[str, float]):
        self.running, self.model, self.expected = running, model, expected
        with running.client() as client:
            self.workers = set(client.get("/admin/models", headers=ADMIN).json()["workers"])
        assert len(self.workers) == 2, self.workers
        self.showed: set[str] = set()
        self.in_a_row = 0

    def __call__(self) -> bool:
        with self.running.client() as fresh:
            worker = fresh.get("/admin/models", headers=ADMIN).json()["worker"]
            variants = fresh.get("/experiments").json()["experiments"][self.model]["variants"]
        if {v["name"]: v["weight"] for v in variants} == self.expected:
            self.showed.add(worker)
            self.in_a_row += 1
        else:
            self.in_a_row = 0
        return self.in_a_row >= FRESH_READS and self.showed == self.workers


def test_promote_and_rollback_reach_every_worker_and_the_history(deployment: tuple[Deployment, Any]) -> None:
    running, _ = deployment
    with running.client() as client:
        refused = client.post("/experiments/wine/rollback", json={"variant": "shuffled"})
        assert refused.status_code == 401
        rolled = client.post("/experiments/wine/rollback", json={"variant": "shuffled", "reason": "inferior"},
                             headers=ADMIN)
        assert rolled.status_code == 200, rolled.text
        wait_for(EveryWorker(running, "wine", {"sklearn-v1": 1.0, "onnx-v2": 1.0, "shuffled": 0.0}),
                 "rolled back in every worker")
        promoted = client.post("/experiments/wine/promote", json={"variant": "onnx-v2", "reason": "non-inferior"},
                               headers=ADMIN)
        assert promoted.status_code == 200, promoted.text
        wait_for(EveryWorker(running, "wine", {"sklearn-v1": 0.0, "onnx-v2": 1.0, "shuffled": 0.0}),
                 "promoted in every worker")
        changes = client.get("/experiments/wine/history").json()["changes"]
    assert [(c["source"], c["reason"]) for c in changes[:2]] == [("promote", "non-inferior"), ("rollback", "inferior")]
    assert changes[0]["new_weights"] == {"sklearn-v1": 0.0, "onnx-v2": 1.0, "shuffled": 0.0}
    assert changes[1]["old_weights"] == {"sklearn-v1": 1.0, "onnx-v2": 1.0, "shuffled": 1.0}


def test_a_restart_keeps_the_evidence_and_the_weights(deployment: tuple[Deployment, Any]) -> None:
    running, _ = deployment
    with running.client() as client:
        before = (client.get("/experiments/wine/history").json(), client.get("/experiments/wine/decision").json(),
                  client.get("/experiments/digits/report").json()["outcomes"]["variants"])
    running.restart()
    with running.client() as client:
        after = (client.get("/experiments/wine/history").json(), client.get("/experiments/wine/decision").json(),
                 client.get("/experiments/digits/report").json()["outcomes"]["variants"])
        weights = {v["name"]: v["weight"] for v in client.get("/experiments").json()["experiments"]["wine"]["variants"]}
    assert after[0] == before[0]
    assert [(c["variant"], c["verdict"], c["n"]) for c in after[1]["candidates"]] == [
        (c["variant"], c["verdict"], c["n"]) for c in before[1]["candidates"]]
    assert {v: m["accuracy"] for v, m in after[2].items()} == {v: m["accuracy"] for v, m in before[2].items()}
    assert weights == {"sklearn-v1": 0.0, "onnx-v2": 1.0, "shuffled": 0.0}


def dropped(client: httpx.Client) -> float:
    text = client.get("/metrics").text
    return sum(float(v) for v in re.findall(r'^bundle_log_dropped_total\{[^}]*reason="store_error"[^}]*\} (\S+)',
                                            text, re.MULTILINE))


@pytest.mark.parametrize("deployment", ["postgresql"], indirect=True)  # a database server can be stopped
def test_a_store_that_is_down_degrades_the_experiment_never_the_answers(
        deployment: tuple[Deployment, PostgresCluster | None]) -> None:
    running, cluster = deployment
    assert cluster is not None
    data = datasets.load("cancer")
    with running.client() as client:
        before = dropped(client)
        cluster.stop()
        try:
            for _ in range(5):
                answers = predict(client, "cancer", data.x_test[:20], [f"u{i}" for i in range(20)])
                assert len(answers) == 20
            wait_for(lambda: dropped(client) > before, "counted as dropped")
            ready = client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["checks"]["experiment_store"]["degraded"]
            feedback = client.post("/feedback", json={"feedback": [{"prediction_id": answers[0]["prediction_id"],
                                                                    "label": "benign"}]}, headers=FEEDBACK)
            assert feedback.status_code == 503 and "Retry-After" in feedback.headers, feedback.text
            report = client.get("/experiments/cancer/report")
            assert report.status_code == 200 and "error" in report.json()["outcomes"]
        finally:
            cluster.start()
        answers = predict(client, "cancer", data.x_test[:5], [f"v{i}" for i in range(5)])
        item = [{"prediction_id": answers[-1]["prediction_id"], "label": "benign"}]
        wait_for(lambda: client.post("/feedback", json={"feedback": item}, headers=FEEDBACK)
                 .json()["results"][0]["status"] == "matched", "logged again once the store is back")
