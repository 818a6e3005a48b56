"""A fleet behaves as one service: PostgreSQL, 3 replicas, HAProxy and Prometheus started by
``harness/fleet.py`` as ``python -m harness.fleet up`` starts them. The split holds across the fleet
and the report of any replica counts the whole fleet's rows, a user keeps a variant whichever replica
answers, a weight change taken by one replica is in force on all within a second, feedback taken by one
counts in the decision of another, Prometheus sums the replicas to the client's own count, the
database going away costs the log, never an answer, and a replica killed under load costs only its
requests in flight, loses no committed row and rejoins with the weights in force.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common import datasets
from common.metrics import counter_totals
from experiments.live import RECONNECT_MAX_S
from harness import fleet as fleets

pytestmark = pytest.mark.slow

USERS = 3000
ROWS = 40  # test-split rows sent per model (wine has 45)
THREADS = 12
SPLIT_TOLERANCE = 0.05  # observed share within 5 points of the configured one
PROPAGATION_LIMIT_S = 1.0  # the bound; polling every repository.poll_s (0.5 s) should need ~0.5 s
CHECK_INTER_S, CHECK_FALL = 1.0, 2  # deploy/haproxy/haproxy.cfg default-server inter / fall
SCRAPE_INTERVAL_S = 5.0  # deploy/prometheus/prometheus.yml
PROPAGATION_ROUNDS = 5  # weight changes measured, each seen by the 2 other replicas
FLUSH_WAIT_S = 5.0  # deadline for the log writers' next flush (store.flush_ms: 100 ms), never a measured time
STORE_COUNTS = "store: every replica"  # counts_from of a report summed over the fleet (Ledger.traffic)


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


def report_counts(client: httpx.Client, url: str, model: str) -> tuple[dict[str, float], str]:
    """A replica's report: routed rows per variant under the weights in force, and where it counted them."""
    report = client.get(f"{url}/experiments/{model}/report").json()
    return {v["name"]: v["count"] for v in report["variants"]}, report["counts_from"]


def until(condition: Callable[[], bool], deadline_s: float) -> bool:
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def sql(fleet: fleets.Fleet, query: str) -> list[tuple]:
    with psycopg.connect(fleet.postgres.url, autocommit=True) as conn:
        return conn.execute(query).fetchall()


def test_the_split_holds_across_the_fleet_and_every_answer_names_its_replica(
        fleet: fleets.Fleet, rows: dict[str, list[list[float]]]) -> None:
    with httpx.Client(timeout=60) as client:
        configured = weights(client, fleet.url, "wine")
        before, _ = report_counts(client, fleet.replicas[0].url, "wine")

        def one(i: int) -> tuple[str, str]:
            answer = predict(client, fleet.url, "wine", rows["wine"][i % ROWS], f"split-user-{i}")
            assert answer.status_code == 200, answer.text
            return answer.json()[0]["variant"], answer.headers["x-replica-id"]

        with ThreadPoolExecutor(THREADS) as pool:
            answers = list(pool.map(one, range(USERS)))
        variants = Counter(v for v, _ in answers)
        # the report of any replica counts every replica's rows: the store sums each worker's totals
        expected = {name: before.get(name, 0) + variants[name] for name in configured}
        for server in fleet.replicas:
            assert until(lambda url=server.url: report_counts(client, url, "wine")[0] == expected, FLUSH_WAIT_S), (
                server.url, report_counts(client, server.url, "wine"), expected)
            assert report_counts(client, server.url, "wine")[1] == STORE_COUNTS
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


def version_in_force(client: httpx.Client, url: str, model: str) -> float:
    """The oldest store version of ``model``'s experiment in force among a replica's workers."""
    families = text_string_to_metric_families(client.get(f"{url}/metrics").text)
    return min(sample.value for family in families if family.name == "bundle_experiment_version"
               for sample in family.samples if sample.labels["model"] == model)


def propagate(client: httpx.Client, fleet: fleets.Fleet, model: str, new: dict[str, float], reason: str,
              limit_s: float) -> dict[str, float]:
    """Change ``model``'s weights through replica 1, then poll the others until every worker of each has
    the change in force (``bundle_experiment_version``): seconds from the change's answer to the end of
    the first read showing it."""
    others = [s.url for s in fleet.replicas[1:]]
    changed = client.put(f"{fleet.replicas[0].url}/experiments/{model}", headers=admin(fleet),
                         json={"weights": new, "reason": reason})
    assert changed.status_code == 200, changed.text
    sent, version = time.monotonic(), changed.json()["version"]
    seen: dict[str, float] = {}
    while len(seen) < len(others) and time.monotonic() - sent < limit_s:
        for url in others:
            if url not in seen and version_in_force(client, url, model) >= version:
                seen[url] = time.monotonic() - sent
        time.sleep(0.02)
    assert len(seen) == len(others), f"not applied within {limit_s} s: {seen}"
    # every worker has it: reads on fresh connections, wherever they land, serve the new weights
    for url in others * 4:
        with httpx.Client(timeout=30) as fresh:
            assert weights(fresh, url, model) == new, url
    return seen


def test_a_weight_change_on_one_replica_is_in_force_on_all_within_a_second(fleet: fleets.Fleet) -> None:
    with httpx.Client(timeout=30) as client:
        before = weights(client, fleet.replicas[0].url, "cancer")
        delays: list[float] = []
        for round_ in range(PROPAGATION_ROUNDS):
            new = {name: (3.0 + round_ if i == 0 else 1.0) for i, name in enumerate(before)}
            assert new != before
            delays += propagate(client, fleet, "cancer", new, "fleet test", 5 * PROPAGATION_LIMIT_S).values()
            before = new
        history = client.get(f"{fleet.replicas[1].url}/experiments/cancer/history").json()["changes"]
        # What following the store costs while idle: transactions per second per replica (each worker
        # polls the experiments and the model repository every repository.poll_s).
        query = "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = 'bundle'"
        first, at = sql(fleet, query)[0][0], time.monotonic()
        time.sleep(4)
        idle = (sql(fleet, query)[0][0] - first) / (time.monotonic() - at) / len(fleet.replicas)
    print(f"\nweight propagation to the other replicas over {len(delays)} observations: median "
          f"{statistics.median(delays):.3f} s, max {max(delays):.3f} s; idle store load {idle:.1f} "
          f"transactions/s per replica")
    assert max(delays) < PROPAGATION_LIMIT_S, delays
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
    assert decision["counts_from"] == STORE_COUNTS  # the error guardrail's rows: every replica's


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

        # a client per batch: between batches the test waits for scrapes longer than HAProxy keeps an idle
        # connection open (timeout http-request, 10 s), and a request sent as it closes is lost
        with httpx.Client(timeout=60) as client, ThreadPoolExecutor(THREADS) as pool:
            return Counter(pool.map(one, users))

    def scraped(expected: dict[str, float]) -> dict[str, float]:
        deadline = time.monotonic() + 4 * SCRAPE_INTERVAL_S  # the next scrape of every replica, with room
        while (counted := prometheus_counts(fleet, "digits")) != expected and time.monotonic() < deadline:
            time.sleep(0.5)
        return counted

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


def dropped_in_store_errors(fleet: fleets.Fleet) -> float:
    """Log rows dropped because a write failed, summed over every replica's /metrics."""
    return sum(counter_totals(text_string_to_metric_families(httpx.get(f"{s.url}/metrics", timeout=10).text),
                              "bundle_log_dropped", ("reason",)).get(("store_error",), 0.0)
               for s in fleet.replicas)


def test_the_database_going_away_costs_the_log_and_changes_never_an_answer(
        fleet: fleets.Fleet, rows: dict[str, list[list[float]]]) -> None:
    sent = 30
    with httpx.Client(timeout=60) as client:
        before_weights = weights(client, fleet.url, "digits")
        before_dropped = dropped_in_store_errors(fleet)
        fleet.postgres.stop()
        try:
            answers = [predict(client, fleet.url, "digits", rows["digits"][i % ROWS], f"outage-user-{i}")
                       for i in range(sent)]
            assert [a.status_code for a in answers] == [200] * sent, [a.text for a in answers if a.status_code != 200]
            assert {a.headers["x-replica-id"] for a in answers} == {fleet.replica_id(i) for i in range(3)}
            assert all(weights(client, s.url, "digits") == before_weights for s in fleet.replicas)  # the last known
            new = {name: (5.0 if i == 0 else 1.0) for i, name in enumerate(before_weights)}
            refused = client.put(f"{fleet.replicas[0].url}/experiments/digits", headers=admin(fleet),
                                 json={"weights": new, "reason": "during the outage"})
            assert refused.status_code == 503 and "experiment store" in refused.text, refused.text
            for server in fleet.replicas:
                ready = client.get(f"{server.url}/readyz")
                assert ready.status_code == 200 and ready.json()["degraded"] is True, ready.text
            # every row answered meanwhile is dropped and counted (after the writers' backoff, within
            # seconds), with the inputs sampled for the drift check (monitoring.sample_fraction)
            assert until(lambda: dropped_in_store_errors(fleet) - before_dropped >= sent, 3 * RECONNECT_MAX_S)
            # the replica's log says so, naming the replica, at its next poll of the store (the drops
            # above can all be counted within a second, before that poll)
            first = fleet.replicas[0]

            def unreachable() -> list[dict]:
                return [json.loads(line) for line in first.output().splitlines()
                        if "experiment store unreachable" in line]

            assert until(lambda: bool(unreachable()), 3 * RECONNECT_MAX_S)
            lines = unreachable()
            assert lines and lines[0]["replica"] == fleet.replica_id(0), lines
        finally:
            fleet.postgres.start()
        restarted = time.monotonic()
        while (changed := client.put(f"{fleet.replicas[0].url}/experiments/digits", headers=admin(fleet),
                                     json={"weights": new, "reason": "after the outage"})).status_code == 503:
            assert time.monotonic() - restarted < 2 * RECONNECT_MAX_S, changed.text
            time.sleep(0.2)
        assert changed.status_code == 200, changed.text
        reconnected = time.monotonic() - restarted
        # every worker of every replica follows again: its watcher's next attempt is at most
        # RECONNECT_MAX_S away
        version = changed.json()["version"]
        assert until(lambda: all(version_in_force(client, s.url, "digits") >= version for s in fleet.replicas),
                     RECONNECT_MAX_S + 2 * PROPAGATION_LIMIT_S)
        assert all(weights(client, s.url, "digits") == new for s in fleet.replicas)
        applied = time.monotonic() - restarted
        for server in fleet.replicas:
            assert until(lambda url=server.url: client.get(f"{url}/readyz").json()["degraded"] is False,
                         3 * RECONNECT_MAX_S)
    print(f"\nstore outage: a change accepted {reconnected:.2f} s after PostgreSQL was back, in force on "
          f"every replica after {applied:.2f} s")


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
    committed = {table: {row[0] for row in sql(fleet, f"SELECT {key} FROM {table}")}
                 for table, key in (("predictions", "prediction_id"), ("feedback", "prediction_id"),
                                    ("weight_changes", "id"))}
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

    # While it is down the weights change; restarted, its first answers already follow them.
    with httpx.Client(timeout=60) as client:
        names = list(weights(client, fleet.url, "wine"))
        new = {name: (1.0 if name == names[-1] else 0.0) for name in names}
        changed = client.put(f"{fleet.replicas[0].url}/experiments/wine", headers=admin(fleet),
                             json={"weights": new, "reason": "while replica 3 is down"})
        assert changed.status_code == 200, changed.text
        restarting = time.monotonic()
        server = fleet.restart(2)
        restarted = time.monotonic() - restarting
        first = [predict(client, server.url, "wine", rows["wine"][i], f"rejoin-user-{i}") for i in range(20)]
        assert {(a.status_code, a.json()[0]["variant"]) for a in first} == {(200, names[-1])}, first[0].text
        assert all(weights(client, server.url, "wine") == new for _ in range(4))
    assert until(lambda: fleet.backend_status()[victim_name] == "UP", 3 * CHECK_INTER_S)
    # nothing committed before the kill is lost: the victim's log rows, feedback and history included
    for table, key in (("predictions", "prediction_id"), ("feedback", "prediction_id"), ("weight_changes", "id")):
        after = {row[0] for row in sql(fleet, f"SELECT {key} FROM {table}")}
        assert committed[table] <= after, (table, len(committed[table] - after))
    print(f"\nreplica killed: HAProxy marked it down after {detected:.2f} s; restarted and ready in "
          f"{restarted:.1f} s; {len(committed['predictions'])} log rows, {len(committed['feedback'])} "
          f"feedback and {len(committed['weight_changes'])} history rows committed before the kill all kept")
