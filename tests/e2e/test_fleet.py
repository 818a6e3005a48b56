"""A fleet behaves as one service: PostgreSQL, 3 replicas, HAProxy and Prometheus started by
``harness/fleet.py`` as ``python -m harness.fleet up`` starts them. The split holds across the fleet,
a user keeps a variant whichever replica answers, a weight change taken by one replica is in force on
all within a second, feedback taken by one counts in the decision of another, Prometheus sums the
replicas to the client's own count, and a replica killed under load costs only its requests in flight.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from common import datasets
from harness import fleet as fleets

pytestmark = pytest.mark.slow

USERS = 3000
ROWS = 40  # test-split rows sent per model (wine has 45)
THREADS = 12
SPLIT_TOLERANCE = 0.05  # observed share within 5 points of the configured one
PROPAGATION_LIMIT_S = 1.0  # the bound; polling every repository.poll_s (0.5 s) should need ~0.5 s
CHECK_INTER_S, CHECK_FALL = 1.0, 2  # deploy/haproxy/haproxy.cfg default-server inter / fall
SCRAPE_INTERVAL_S = 5.0  # deploy/prometheus/prometheus.yml


@pytest.fixture(scope="module")
def fleet(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[fleets.Fleet]:
    running = fleets.up(model_store, tmp_path_factory.mktemp("fleet"))
    try:
        yield running
    finally:
        running.down()


@pytest.fixture(scope="module")
def rows() -> dict[str, list[list[float]]]:
    """A few real test-split rows per model, as lists."""
    out = {}
    for model, family in (("wine", "wine"), ("cancer", "cancer"), ("digits", "digits")):
        split = datasets.load(family)
        out[model] = np.asarray(split.x_test[:ROWS], dtype=np.float32).tolist()
    return out


def predict(client: httpx.Client, url: str, model: str, inputs: list, user: str) -> httpx.Response:
    return client.post(f"{url}/predict", json={"instances": [{"model": model, "inputs": inputs, "user_id": user}]})


def weights(client: httpx.Client, url: str, model: str) -> dict[str, float]:
    experiment = client.get(f"{url}/experiments").json()["experiments"][model]
    return {v["name"]: v["weight"] for v in experiment["variants"]}


def admin(fleet: fleets.Fleet) -> dict[str, str]:
    return {"Authorization": f"Bearer {fleet.tokens['BUNDLE_ADMIN_TOKEN']}"}


def test_the_split_holds_across_the_fleet_and_every_answer_names_its_replica(
        fleet: fleets.Fleet, rows: dict[str, list[list[float]]]) -> None:
    with httpx.Client(timeout=60) as client:
        configured = weights(client, fleet.url, "wine")

        def one(i: int) -> tuple[str, str]:
            answer = predict(client, fleet.url, "wine", rows["wine"][i % ROWS], f"split-user-{i}")
            assert answer.status_code == 200, answer.text
            return answer.json()[0]["variant"], answer.headers["x-replica-id"]

        with ThreadPoolExecutor(THREADS) as pool:
            answers = list(pool.map(one, range(USERS)))
    variants = Counter(v for v, _ in answers)
    replicas = Counter(r for _, r in answers)
    assert set(replicas) == {fleet.replica_id(i) for i in range(3)}, replicas
    assert all(n > USERS / 6 for n in replicas.values()), replicas  # round robin: ~1,000 each
    total = sum(configured.values())
    for name, weight in configured.items():
        assert abs(variants[name] / USERS - weight / total) <= SPLIT_TOLERANCE, (variants, configured)


def test_a_user_gets_one_variant_whichever_replica_answers(
        fleet: fleets.Fleet, rows: dict[str, list[list[float]]]) -> None:
    urls = [s.url for s in fleet.replicas] + [fleet.url] * 3
    with httpx.Client(timeout=60) as client:
        for user in (f"sticky-user-{i}" for i in range(40)):
            seen = {(answer.json()[0]["variant"], answer.headers["x-replica-id"])
                    for answer in (predict(client, url, "wine", rows["wine"][0], user) for url in urls)}
            assert len({variant for variant, _ in seen}) == 1, (user, seen)
            assert len({replica for _, replica in seen}) == 3


def test_a_weight_change_on_one_replica_is_in_force_on_all_within_a_second(fleet: fleets.Fleet) -> None:
    others = [s.url for s in fleet.replicas[1:]]
    with httpx.Client(timeout=30) as client:
        before = weights(client, fleet.replicas[0].url, "cancer")
        new = {name: (3.0 if i == 0 else 1.0) for i, name in enumerate(before)}
        assert new != before
        changed = client.put(f"{fleet.replicas[0].url}/experiments/cancer", headers=admin(fleet),
                             json={"weights": new, "reason": "fleet test"})
        assert changed.status_code == 200, changed.text
        sent = time.monotonic()
        seen: dict[str, float] = {}
        while len(seen) < len(others) and time.monotonic() - sent < 5 * PROPAGATION_LIMIT_S:
            for url in others:
                if url not in seen and weights(client, url, "cancer") == new:
                    seen[url] = time.monotonic() - sent
            time.sleep(0.02)
        # every worker of every replica: a few more reads spread over the workers agree too
        assert all(weights(client, url, "cancer") == new for url in others * 4)
        history = client.get(f"{others[0]}/experiments/cancer/history").json()["changes"]
    assert len(seen) == len(others), f"not applied within {5 * PROPAGATION_LIMIT_S} s: {seen}"
    assert max(seen.values()) < PROPAGATION_LIMIT_S, seen
    assert history[0]["reason"] == "fleet test"


def test_feedback_on_one_replica_counts_in_the_decision_of_another(
        fleet: fleets.Fleet, rows: dict[str, list[list[float]]]) -> None:
    with httpx.Client(timeout=60) as client:
        answers = [predict(client, fleet.url, "cancer", rows["cancer"][i], f"feedback-user-{i}").json()[0]
                   for i in range(40)]
        items = [{"prediction_id": a["prediction_id"], "label": a["label"]} for a in answers]
        feedback = {"Authorization": f"Bearer {fleet.tokens['BUNDLE_FEEDBACK_TOKEN']}"}
        deadline = time.monotonic() + 10  # each replica's log writer flushes every store.flush_ms
        while True:
            results = client.post(f"{fleet.replicas[0].url}/feedback", headers=feedback,
                                  json={"feedback": items}).json()["results"]
            if all(r["status"] in ("matched", "duplicate") for r in results) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert all(r["status"] in ("matched", "duplicate") for r in results), results
        decision = client.get(f"{fleet.replicas[2].url}/experiments/cancer/decision").json()
    served = Counter(a["variant"] for a in answers)
    labelled = {name: counts["labelled"] for name, counts in decision["labels"].items()}
    assert labelled == dict(served), (labelled, served)


def prometheus_counts(fleet: fleets.Fleet, model: str) -> dict[str, float]:
    query = f'sum by (variant) (bundle_requests_total{{model="{model}"}})'
    result = httpx.get(f"{fleet.prometheus_url}/api/v1/query", params={"query": query}, timeout=10).json()
    return {r["metric"]["variant"]: float(r["value"][1]) for r in result["data"]["result"]}


def test_prometheus_sums_the_replicas_to_the_clients_own_count(
        fleet: fleets.Fleet, rows: dict[str, list[list[float]]]) -> None:
    def send(users: range) -> Counter[str]:
        def one(i: int) -> str:
            answer = predict(client, fleet.url, "digits", rows["digits"][i % ROWS], f"prometheus-user-{i}")
            assert answer.status_code == 200, answer.text
            return answer.json()[0]["variant"]

        with ThreadPoolExecutor(THREADS) as pool:
            return Counter(pool.map(one, users))

    def scraped(expected: dict[str, float]) -> dict[str, float]:
        deadline = time.monotonic() + 4 * SCRAPE_INTERVAL_S  # the next scrape of every replica, with room
        while (counted := prometheus_counts(fleet, "digits")) != expected and time.monotonic() < deadline:
            time.sleep(0.5)
        return counted

    with httpx.Client(timeout=60) as client:
        # A series' first sample is its first value, not a rise from 0: every replica and variant serves
        # a first batch and is scraped before the counted traffic, so the rate sees all of it.
        first = send(range(60))
        assert scraped(dict(first)) == first
        sent = send(range(60, 360))
    expected = {name: first[name] + n for name, n in sent.items()}
    assert scraped(expected) == expected
    time.sleep(2 * SCRAPE_INTERVAL_S)  # the recording rule's rate needs two scrapes after the traffic
    query = 'model_variant:bundle_requests:rate1m{model="digits"}'
    result = httpx.get(f"{fleet.prometheus_url}/api/v1/query", params={"query": query}, timeout=10).json()
    rates = {r["metric"]["variant"]: float(r["value"][1]) for r in result["data"]["result"]}
    assert set(rates) >= set(sent) and all(rates[name] > 0 for name in sent), rates


def test_a_replica_killed_under_load_costs_only_its_requests_in_flight(
        fleet: fleets.Fleet, rows: dict[str, list[list[float]]]) -> None:
    victim = fleet.replicas[2]
    victim_name = "replica3"
    results: list[tuple[float, int | str, str]] = []  # (started, status or error, replica)
    stop = threading.Event()

    def load(worker: int) -> None:
        with httpx.Client(timeout=30) as client:
            i = 0
            while not stop.is_set():
                started = time.monotonic()
                try:
                    answer = predict(client, fleet.url, "wine", rows["wine"][i % ROWS], f"kill-{worker}-{i}")
                    results.append((started, answer.status_code, answer.headers.get("x-replica-id", "")))
                except httpx.HTTPError as err:
                    results.append((started, type(err).__name__, ""))
                i += 1

    threads = [threading.Thread(target=load, args=(w,)) for w in range(THREADS // 2)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    killing = time.monotonic()
    fleet.kill(2)
    killed = time.monotonic()  # every process of the replica gone: its sockets closed
    while fleet.backend_status()[victim_name] != "DOWN" and time.monotonic() - killed < 10:
        time.sleep(0.05)
    detected = time.monotonic() - killed
    time.sleep(3)
    stop.set()
    for thread in threads:
        thread.join()

    assert fleet.backend_status()[victim_name] == "DOWN"
    assert detected <= CHECK_FALL * CHECK_INTER_S + 1.0, f"HAProxy took {detected:.2f} s to mark it down"
    failed = [(started - killing, status) for started, status, _ in results if status != 200]
    after = [r for r in results if r[0] > killed + detected]
    assert after and all(status == 200 for _, status, _ in after), failed
    assert victim.env["BUNDLE_REPLICA_ID"] not in {replica for _, _, replica in after}
    # only what was in flight while the replica died: connections its kernel still accepted while its
    # processes were being torn down (the sockets close last), none after
    assert all(started_after < killed - killing + 0.05 for started_after, _ in failed), (killed - killing, failed)
