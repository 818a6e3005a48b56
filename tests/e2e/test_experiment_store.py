"""Issue 13 (part): the experiment store and the prediction log writer, on a real SQLite file and a
real PostgreSQL 15 server (no service needed)."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
import threading
import time
import uuid
from typing import Any
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from common.metrics import collect, counter_totals
from experiments import repositorystore, rolloutstore, statestore  # noqa: F401  (their tables join METADATA)
from experiments.outcomes import label_delay
from experiments.trafficstore import TrafficStore
from experiments.predictionlog import TOTALS_EVERY_S, WRITER_NICE, PredictionLog
from experiments.store import (FEEDBACK, METADATA, MIGRATIONS, PREDICTION_DEFAULTS, PREDICTIONS, SHADOW,
                               SQLITE_ROWS_PER_INSERT, ExperimentStore,
                               prediction_row, user_key)
from tests import ROOT
from harness.postgres import PostgresCluster

pytestmark = pytest.mark.slow  # servers, databases or builds of its own

HEAD = ScriptDirectory(str(MIGRATIONS)).get_current_head()
"""The newest migration: every test store must end there."""
CLASSES = {"cancer": ["malignant", "benign"], "digits": [str(d) for d in range(10)]}
NOW = 1_800_000_000.0
WAIT_S = 60  # deadline for an outcome of the background writer, never a measured duration


def classes_of(model: str) -> list[str] | None:
    return CLASSES.get(model)


def prediction(pid: str, model: str = "cancer", variant: str = "a", served_at: float = NOW, label_index: int = 0,
               **extra: Any) -> dict[str, Any]:
    """A live log row as the service writes it (optional columns left to their defaults)."""
    classes = CLASSES[model]
    probabilities = [0.1 / (len(classes) - 1)] * len(classes)
    probabilities[label_index] = 0.9
    return {"prediction_id": pid, "served_at": served_at, "model": model, "variant": variant,
            "model_tag": f"{model}_{variant}:v1", "endpoint": "predict", "label": classes[label_index],
            "label_index": label_index, "top_probability": 0.9, "probabilities": probabilities,
            "latency_ms": 2.0, **extra}


def shadow(pid: str, label_index: int, served_at: float = NOW) -> dict[str, Any]:
    return {"prediction_id": pid, "served_at": served_at, "variant": "shadow", "model_tag": "cancer_shadow:v1",
            "label": CLASSES["cancer"][label_index], "label_index": label_index,
            "probabilities": [0.8, 0.2] if label_index == 0 else [0.2, 0.8]}


def count(store: ExperimentStore, table: sa.Table) -> int:
    with store.engine.connect() as conn:
        return conn.scalar(sa.select(sa.func.count()).select_from(table))


def revision(store: ExperimentStore) -> str:
    with store.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"still not {what} after {WAIT_S} s"
        time.sleep(0.05)


def dropped(reason: str) -> float:
    return counter_totals(collect(), "bundle_log_dropped", ("reason",)).get((reason,), 0.0)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """A new empty store: an SQLite file in folders that do not exist yet, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/new/folder/experiments.sqlite"
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    return cluster.create_database(f"store_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def store(url: str) -> Iterator[ExperimentStore]:
    opened = ExperimentStore.connect(url)
    yield opened
    opened.close()


def test_migrations_are_idempotent_and_match_the_tables_queried(url: str) -> None:
    first = ExperimentStore.connect(url)
    first.insert_predictions([prediction("p1")])
    again = ExperimentStore.connect(url)
    again.migrate()
    assert revision(again) == HEAD
    assert count(again, PREDICTIONS) == 1
    with again.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), METADATA) == []
        if again.backend == "sqlite":
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    assert again.healthy() == (True, f"{again.backend} store reachable")
    first.close()
    again.close()


def test_two_processes_starting_at_once_migrate_once(url: str) -> None:
    start_at = time.time() + 5  # both children import first, then migrate at the same moment
    code = ("import sys, time; from experiments.store import ExperimentStore; "
            "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); ExperimentStore.connect(sys.argv[1])")
    children = [subprocess.Popen([sys.executable, "-c", code, url, str(start_at)], cwd=ROOT, stderr=subprocess.PIPE,
                                 text=True) for _ in range(2)]
    for child in children:
        _, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
    store = ExperimentStore(url)
    assert revision(store) == HEAD
    assert set(sa.inspect(store.engine).get_table_names()) == {"alembic_version", *METADATA.tables}
    store.close()


def test_an_older_schema_is_upgraded_and_keeps_its_data(url: str) -> None:
    old = ExperimentStore(url)
    old.migrate("0001")  # the schema of the first version: the log and feedback, no history tables
    logged = sa.Table("predictions", sa.MetaData(), autoload_with=old.engine)  # its columns, as it wrote them
    defaults = {key: value for key, value in PREDICTION_DEFAULTS.items() if key in logged.c}
    with old.engine.begin() as conn:
        conn.execute(logged.insert(), [{**defaults, **prediction("p1")}, {**defaults, **prediction("p2", label_index=1)}])
    assert old.apply_feedback([{"prediction_id": "p1", "label": "benign"}], classes_of)[0]["status"] == "matched"
    assert "weight_changes" not in sa.inspect(old.engine).get_table_names()
    old.close()

    new = ExperimentStore.connect(url)
    assert revision(new) == HEAD
    assert count(new, PREDICTIONS) == 2
    assert list(new.joined("cancer").actual) == [1]
    assert list(new.joined("cancer").unit) == ["p1"]  # logged before requests were: a unit of its own
    new.record_weight_change("cancer", "admin", {"a": 1}, {"a": 0}, "upgraded store")
    assert new.history("cancer")[0]["reason"] == "upgraded store"
    new.close()


def test_predictions_and_shadow_answers_are_logged_once(store: ExperimentStore) -> None:
    store.insert_predictions([prediction("p1", user_key=user_key("alice", True)), prediction("p1"),
                              prediction("p2", pinned=True, epoch="3f3f9a4e", api_key="app", client_id="c2")])
    store.insert_predictions([prediction("p2")])  # a duplicate id is ignored, not an error
    store.insert_shadow([shadow("p1", 1), shadow("p1", 0)])
    store.insert_shadow([{**shadow("p2", 0), "probabilities": np.array([0.6, 0.4])}])
    assert count(store, PREDICTIONS) == 2
    assert count(store, SHADOW) == 2
    with store.engine.connect() as conn:
        rows = {r.prediction_id: r for r in conn.execute(sa.select(PREDICTIONS))}
    assert rows["p1"].user_key == hashlib.sha256(b"alice").hexdigest()
    assert (rows["p1"].pinned, rows["p1"].epoch, rows["p1"].client_id) == (False, "", None)
    assert (rows["p2"].pinned, rows["p2"].epoch, rows["p2"].api_key, rows["p2"].client_id) == (True, "3f3f9a4e", "app", "c2")
    assert rows["p2"].probabilities == pytest.approx([0.9, 0.1])
    assert user_key("alice", False) == "alice" and user_key(None, True) is None


def test_a_flush_larger_than_one_insert_statement_is_written_whole(store: ExperimentStore) -> None:
    """The log's bulk write splits rows over several statements on SQLite; none is lost or written twice,
    and an id already stored, or repeated in a later statement of the same flush, is skipped."""
    store.insert_predictions([prediction("p7")])
    total = 2 * SQLITE_ROWS_PER_INSERT + 3
    rows = [prediction(f"p{i}", label_index=i % 2, client_id=f"c{i}") for i in range(total)]
    store.insert_predictions(rows + [prediction("p3", label_index=0)])
    assert count(store, PREDICTIONS) == total
    with store.engine.connect() as conn:
        logged = {r.prediction_id: r for r in conn.execute(sa.select(PREDICTIONS))}
    last = f"p{total - 1}"
    assert (logged[last].client_id, logged[last].label_index) == (f"c{total - 1}", (total - 1) % 2)
    assert logged[last].probabilities == pytest.approx(rows[-1]["probabilities"])
    assert logged["p7"].client_id is None and logged["p3"].label_index == 1


def test_feedback_answers_each_item(store: ExperimentStore) -> None:
    store.insert_predictions([prediction(f"p{i}", client_id=f"client-{i}") for i in range(5)]
                             + [prediction("old", client_id="reused", served_at=NOW - 60),
                                prediction("new", client_id="reused")])
    answers = store.apply_feedback([
        {"prediction_id": "p0", "label": "malignant"},
        {"prediction_id": "p0", "label": "malignant"},
        {"prediction_id": "p0", "label": "benign"},
        {"prediction_id": "nope", "label": "benign"},
        {"id": "nope", "label": "benign"},
        {"prediction_id": "p1", "label": "cat"},
        {"prediction_id": "p1", "label": 2},
        {"id": "client-2", "label": 1},
        {"prediction_id": "p3", "reward": 0.7},
        {"prediction_id": "p3", "reward": math.nan},
        {"prediction_id": "p4"},
        {"prediction_id": "p4", "id": "client-4", "label": 0},
        {"prediction_id": "p4", "lable": 0},
        {"id": "reused", "label": "benign"},
        "p4",
    ], classes_of, now=NOW + 10)
    statuses = [(a["status"], a.get("prediction_id"), a.get("correction", False)) for a in answers]
    assert statuses == [
        ("matched", "p0", False), ("duplicate", "p0", False), ("matched", "p0", True),
        ("unknown_id", "nope", False), ("unknown_id", None, False),
        ("invalid", "p1", False), ("invalid", "p1", False),
        ("matched", "p2", False), ("matched", "p3", False), ("invalid", "p3", False),
        ("invalid", "p4", False), ("invalid", "p4", False), ("invalid", "p4", False),
        ("matched", "new", False), ("invalid", None, False)]
    assert answers[4]["id"] == "nope" and answers[7]["id"] == "client-2"
    assert "'malignant', 'benign'" in answers[5]["reason"]
    assert "out of range" in answers[6]["reason"] and "0..1" in answers[6]["reason"]
    assert "finite" in answers[9]["reason"]
    assert "label" in answers[10]["reason"] and "exactly one" in answers[11]["reason"]
    assert "lable" in answers[12]["reason"]

    later = store.apply_feedback([{"prediction_id": "p0", "label": "benign"},  # the correction was kept
                                  {"prediction_id": "p0", "label": 0},  # an index is a label too
                                  {"prediction_id": "p3", "label": "benign"},  # adds a label to a reward
                                  {"prediction_id": "p3", "reward": 0.2}], classes_of, now=NOW + 20)
    assert [(a["status"], a.get("correction", False)) for a in later] == [
        ("duplicate", False), ("matched", True), ("matched", False), ("matched", True)]
    with store.engine.connect() as conn:
        outcomes = {r.prediction_id: r for r in conn.execute(sa.select(FEEDBACK))}
    assert set(outcomes) == {"p0", "p2", "p3", "new"}
    assert (outcomes["p0"].label, outcomes["p0"].label_index, outcomes["p0"].corrections) == ("malignant", 0, 2)
    assert (outcomes["p2"].label, outcomes["p2"].label_index, outcomes["p2"].received_at) == ("benign", 1, NOW + 10)
    assert (outcomes["p3"].label, outcomes["p3"].reward, outcomes["p3"].corrections) == ("benign", 0.2, 1)


def test_feedback_takes_ten_thousand_items_in_one_call(store: ExperimentStore) -> None:
    n = 10_000
    store.insert_predictions([prediction(f"p{i}", client_id=f"c{i}") for i in range(n)])
    items = [{"prediction_id": f"p{i}", "label": i % 2} if i % 2 else {"id": f"c{i}", "label": "malignant"}
             for i in range(n)]
    answers = store.apply_feedback(items, classes_of)
    assert [a["status"] for a in answers] == ["matched"] * n
    assert count(store, FEEDBACK) == n
    assert [a["status"] for a in store.apply_feedback(items, classes_of)] == ["duplicate"] * n


def test_joined_gives_labelled_predictions_as_arrays(store: ExperimentStore) -> None:
    store.insert_predictions([
        prediction("p1", variant="a", served_at=NOW, label_index=0, user_key="u1"),
        prediction("p2", variant="b", served_at=NOW + 1, label_index=1, latency_ms=5.0),
        prediction("p3", variant="a", served_at=NOW + 2, label_index=1),
        prediction("unlabelled", served_at=NOW + 3),
        prediction("d1", model="digits", served_at=NOW, label_index=7),
    ])
    store.insert_shadow([shadow("p1", 1), shadow("p2", 1), shadow("unlabelled", 0)])
    store.apply_feedback([{"prediction_id": "p1", "label": "malignant"}, {"prediction_id": "p2", "label": "malignant"},
                          {"prediction_id": "p3", "reward": 0.5}, {"prediction_id": "d1", "label": "7"}],
                         classes_of, now=NOW + 100)
    joined = store.joined("cancer")
    assert len(joined) == 3
    assert list(joined.prediction_id) == ["p1", "p2", "p3"]
    assert list(joined.variant) == ["a", "b", "a"]
    assert list(joined.user_key) == ["u1", None, None]
    assert list(joined.predicted) == [0, 1, 1]
    assert list(joined.actual) == [0, 0, -1]
    assert np.isnan(joined.reward[:2]).all() and joined.reward[2] == 0.5
    # scored when the label arrived: p1 answered malignant at 0.9, p2 benign at 0.9 (malignant 0.1)
    assert joined.log_loss[:2] == pytest.approx([-math.log(0.9), -math.log(0.1)])
    assert joined.brier[:2] == pytest.approx([2 * 0.1**2, 2 * 0.9**2])
    assert np.isnan(joined.log_loss[2]) and np.isnan(joined.brier[2])  # a reward scores no probability
    assert list(joined.served_at) == [NOW, NOW + 1, NOW + 2]
    assert list(joined.labelled_at) == [NOW + 100] * 3
    assert list(joined.latency_ms) == [2.0, 5.0, 2.0]
    assert list(store.joined("cancer", since=NOW + 1).prediction_id) == ["p2", "p3"]
    assert store.joined("digits").log_loss == pytest.approx([-math.log(0.9)])
    assert len(store.joined("unknown")) == 0 and store.joined("unknown").brier.shape == (0,)

    paired = store.joined_shadow("cancer")
    assert list(paired.prediction_id) == ["p1", "p2"]
    assert list(paired.variant) == ["a", "b"] and list(paired.shadow_variant) == ["shadow", "shadow"]
    assert list(paired.predicted) == [0, 1]
    assert list(paired.shadow_predicted) == [1, 1]
    assert list(paired.actual) == [0, 0]


def test_label_counts_and_latency_per_variant(store: ExperimentStore) -> None:
    horizon = 3600.0
    store.insert_predictions(
        [prediction(f"a{i}", variant="a", served_at=NOW - 100 - i, latency_ms=float(i + 1)) for i in range(20)]
        + [prediction("a-old", variant="a", served_at=NOW - 2 * horizon, latency_ms=1.0),
           prediction("b1", variant="b", served_at=NOW - 50, latency_ms=7.0)])
    store.apply_feedback([{"prediction_id": "a0", "label": 0}, {"prediction_id": "a1", "label": 1},
                          {"prediction_id": "a2", "reward": 1.0}], classes_of, now=NOW)
    store.apply_feedback([{"prediction_id": "b1", "label": 1}], classes_of, now=NOW - 40)
    counts = store.label_counts("cancer", horizon, now=NOW)
    assert counts == {
        "a": {"served": 21, "labelled": 3, "pending": 17, "expired": 1, "median_label_delay_s": 101.0},
        "b": {"served": 1, "labelled": 1, "pending": 0, "expired": 0, "median_label_delay_s": 10.0},
    }
    assert store.label_counts("unknown", horizon) == {}
    assert store.served_counts("cancer") == {"a": 21, "b": 1}  # labelled or not
    assert store.served_counts("cancer", since=NOW - 109.5) == {"a": 10, "b": 1}
    # Nearest rank: the 95th percentile of 21 latencies (1, 1..20 ms) is the 20th smallest, 19 ms.
    assert store.variant_latency("cancer") == {"a": 19.0, "b": 7.0}
    assert store.variant_latency("cancer", since=NOW - 109.5) == {"a": 10.0, "b": 7.0}  # a0..a9: 1..10 ms


def test_units_are_users_and_requests_without_a_user(store: ExperimentStore) -> None:
    """The split randomizes users, and a request without a user as a whole: the sample-ratio test
    counts each once however many rows it sent; a row logged before requests were is its own unit."""
    store.insert_predictions(
        [prediction(f"u{i}", user_key="alice", epoch="e1") for i in range(5)]
        + [prediction(f"r{i}", request_id="r0", epoch="e1") for i in range(40)]
        + [prediction("old", epoch="e1"), prediction("b1", variant="b", request_id="b1", epoch="e1"),
           prediction("pinned", variant="b", pinned=True, epoch="e1"), prediction("other", epoch="e0")])
    assert store.assigned_units("cancer", "e1") == {"a": 3, "b": 1}
    store.apply_feedback([{"prediction_id": pid, "label": 0} for pid in ("u0", "u1", "r0", "r1", "old")],
                         classes_of, now=NOW)
    assert list(store.joined("cancer").unit) == ["alice", "alice", "r0", "r0", "old"]


def test_feedback_hours_later_is_matched_and_its_delay_is_hours(store: ExperimentStore) -> None:
    hours = 5 * 3600.0
    served_at = time.time() - hours
    store.insert_predictions([prediction("late", served_at=served_at, client_id="late-order"),
                              prediction("later", served_at=served_at)])
    answers = store.apply_feedback([{"id": "late-order", "label": "malignant"},
                                    {"prediction_id": "later", "label": "benign"}], classes_of)  # now
    assert [(a["status"], a["prediction_id"]) for a in answers] == [("matched", "late"), ("matched", "later")]
    # labelled past a one-hour horizon: late, never expired
    counts = store.label_counts("cancer", horizon_s=3600.0)["a"]
    assert (counts["served"], counts["labelled"], counts["pending"], counts["expired"]) == (2, 2, 0, 0)
    assert hours <= counts["median_label_delay_s"] < hours + WAIT_S
    joined = store.joined("cancer")
    assert list(joined.actual) == [0, 1]
    delay = label_delay(joined.served_at, joined.labelled_at)
    assert delay == {"median": pytest.approx(counts["median_label_delay_s"]),
                     "p90": pytest.approx(counts["median_label_delay_s"])}


def test_weight_history_and_decisions_newest_first(store: ExperimentStore) -> None:
    store.record_weight_change("digits", "admin", {"a": 1, "b": 1}, {"a": 1, "b": 3}, "ramp", at=NOW)
    store.record_weight_change("digits", "promote", {"a": 1, "b": 3}, {"a": 0, "b": 1}, "non-inferior", at=NOW + 1)
    store.record_weight_change("cancer", "rollback", {"a": 1, "b": 1}, {"a": 1, "b": 0}, "worse", at=NOW)
    history = store.history("digits")
    assert [(h["source"], h["new_weights"], h["reason"], h["at"]) for h in history] == [
        ("promote", {"a": 0, "b": 1}, "non-inferior", NOW + 1), ("admin", {"a": 1, "b": 3}, "ramp", NOW)]
    assert history[0]["old_weights"] == {"a": 1, "b": 3}
    assert len(store.history("digits", limit=1)) == 1
    store.record_decision("digits", "b", "continue", {"labels": 10}, at=NOW)
    store.record_decision("digits", "b", "promote", {"labels": 900, "method": "mSPRT"}, at=NOW + 5)
    assert [(d["verdict"], d["candidate"], d["detail"]) for d in store.decisions("digits")] == [
        ("promote", "b", {"labels": 900, "method": "mSPRT"}), ("continue", "b", {"labels": 10})]
    assert store.decisions("cancer") == []


def test_prune_by_age_and_by_rows(store: ExperimentStore) -> None:
    day = 86_400
    store.insert_predictions([prediction(f"p{i}", served_at=NOW - i * day) for i in range(5)])
    store.insert_shadow([shadow(f"p{i}", 0, served_at=NOW - i * day) for i in range(5)])
    store.apply_feedback([{"prediction_id": f"p{i}", "label": 0} for i in range(5)], classes_of)
    assert store.prune(retention_days=2.5, retention_rows=None, now=NOW) == 2 * 3  # p3, p4: 3 rows each
    assert count(store, PREDICTIONS) == count(store, SHADOW) == count(store, FEEDBACK) == 3
    assert store.prune(retention_days=None, retention_rows=2, now=NOW) == 3  # p2
    assert sorted(store.joined("cancer").prediction_id) == ["p0", "p1"]
    assert store.prune(retention_days=30, retention_rows=10, now=NOW) == 0
    assert store.prune(retention_days=None, retention_rows=None) == 0


def test_prediction_log_writes_within_a_flush(url: str) -> None:
    store = ExperimentStore(url)
    log = PredictionLog(store, queue_rows=1000, flush_s=0.05, retention_days=30, retention_rows=1_000_000)
    try:
        log.submit([prediction_row(prediction(f"p{i}")) for i in range(50)])
        log.submit_shadow([shadow(f"p{i}", 1) for i in range(50)])
        wait_for(lambda: log.status()["written"] == 100, "written")
        assert count(store, PREDICTIONS) == count(store, SHADOW) == 50
        status = log.status()
        assert status["ok"] and status["dropped"] == 0 and status["pending"] == 0
        assert status["last_error"] is None and status["last_flush_at"] is not None
        writer, caller = (os.getpriority(os.PRIO_PROCESS, t) for t in (log._thread.native_id, threading.get_native_id()))
        assert writer == caller + WRITER_NICE  # the worker's event loop goes first
    finally:
        log.close()
        store.close()


def test_a_flush_is_one_transaction_all_or_nothing(url: str) -> None:
    """Predictions, shadow answers and totals of one flush commit together: a shadow row the database
    refuses (no label) leaves none of the flush's predictions or totals, its rows are counted as
    dropped, and the next flush copies the totals again."""
    store = ExperimentStore(url)
    totals: dict = {}
    log = PredictionLog(store, queue_rows=1000, flush_s=0.05, counts=lambda: dict(totals), worker="w1")
    traffic = TrafficStore(store)
    try:
        log.close()  # the writer stops, so that one flush below holds everything queued
        totals[("cancer", "a", "e1", False)] = (3.0, 0.0)
        log.submit([prediction_row(prediction(f"p{i}")) for i in range(3)])
        log.submit_shadow([{**shadow("p0", 1), "label": None}])
        log._flush()
        status = log.status()
        assert (status["written"], status["dropped"], status["ok"]) == (0, 4, False), status
        assert count(store, PREDICTIONS) == count(store, SHADOW) == 0 and traffic.totals() == {}
        log.submit([prediction_row(prediction("p3"))])
        log._flush()
        assert count(store, PREDICTIONS) == 1 and traffic.totals() == totals
        assert log.status()["ok"]
    finally:
        store.close()


def test_each_log_writer_copies_its_workers_totals_and_the_store_sums_them(url: str) -> None:
    """Two workers' writers copy their running totals (rows answered, failed) per variant, epoch and
    pinned; a copy replaces the worker's last one, and the store sums over workers and nothing else."""
    store = ExperimentStore.connect(url)
    running = {"w1": {("cancer", "a", "e1", False): (10.0, 1.0), ("cancer", "b", "e1", False): (5.0, 0.0)},
               "w2": {("cancer", "a", "e1", False): (7.0, 0.0), ("cancer", "a", "e1", True): (2.0, 0.0),
                      ("digits", "a", "e9", False): (3.0, 0.0)}}
    logs = [PredictionLog(store, queue_rows=100, flush_s=0.05, counts=lambda w=w: dict(running[w]), worker=w)
            for w in running]
    traffic = TrafficStore(store)
    try:
        wait_for(lambda: traffic.totals("cancer") == {("cancer", "a", "e1", False): (17.0, 1.0),
                                                      ("cancer", "b", "e1", False): (5.0, 0.0),
                                                      ("cancer", "a", "e1", True): (2.0, 0.0)}, "summed")
        running["w1"][("cancer", "a", "e1", False)] = (12.0, 3.0)  # w1 answered 2 more, failed 2 more
        wait_for(lambda: traffic.totals("cancer")[("cancer", "a", "e1", False)] == (19.0, 3.0), "replaced")
        assert set(traffic.totals()) == {*running["w1"], *running["w2"]}
        assert all(log.status()["ok"] for log in logs)
    finally:
        for log in logs:
            log.close()
        store.close()


def test_the_totals_are_read_and_copied_at_most_once_a_second_and_at_close(url: str) -> None:
    """Issue: performance. Reading and upserting the totals at each flush was a quarter of the log
    writer's CPU: with totals that move at every flush (every 20 ms), they are read about once a second,
    and closing copies the last ones."""
    store = ExperimentStore.connect(url)
    reads: list[float] = []

    def counts() -> dict:
        reads.append(time.monotonic())
        return {("cancer", "a", "e1", False): (float(len(reads)), 0.0)}

    log = PredictionLog(store, queue_rows=100, flush_s=0.02, counts=counts, worker="w1")
    try:
        started = time.monotonic()
        while time.monotonic() - started < 2.5:
            log.submit([prediction_row(prediction(f"t{len(reads)}-{time.monotonic_ns()}"))])
            time.sleep(0.01)
        assert 2 <= len(reads) <= 4, reads  # at 0, ~1 and ~2 s: not once a flush (~100 flushes)
        assert all(b - a >= TOTALS_EVERY_S for a, b in zip(reads, reads[1:]))
        log.close()
        assert TrafficStore(store).totals() == {("cancer", "a", "e1", False): (float(len(reads)), 0.0)}
    finally:
        log.close()
        store.close()

def test_an_idle_writer_reads_unchanged_totals_once_a_second_too(url: str) -> None:
    """With nothing to write and totals that do not move, the reads are still once a second, not once
    a flush: an idle worker costs the same few reads."""
    store = ExperimentStore.connect(url)
    reads: list[float] = []

    def counts() -> dict:
        reads.append(time.monotonic())
        return {("cancer", "a", "e1", False): (1.0, 0.0)}

    log = PredictionLog(store, queue_rows=100, flush_s=0.02, counts=counts, worker="w1")
    try:
        time.sleep(1.5)  # ~75 flushes
        assert 1 <= len(reads) <= 2, reads
        assert TrafficStore(store).totals() == {("cancer", "a", "e1", False): (1.0, 0.0)}
    finally:
        log.close()
        store.close()

def test_prediction_log_drops_rows_beyond_its_queue(url: str) -> None:
    store = ExperimentStore.connect(url)
    log = PredictionLog(store, queue_rows=10, flush_s=0.05)
    before = dropped("queue_full")
    try:
        log.submit([prediction_row(prediction(f"p{i}")) for i in range(25)])  # one call: 10 queued, 15 dropped at once
        assert dropped("queue_full") - before == 15
        wait_for(lambda: log.status()["written"] == 10, "written")
        assert count(store, PREDICTIONS) == 10 and log.status()["dropped"] == 15
    finally:
        log.close()
        store.close()


def test_prediction_log_outlives_a_store_outage() -> None:
    """PostgreSQL down at start, then up, then down and up again: submit never fails, failed writes are
    counted and named, and rows flow again once the server is back."""
    cluster = PostgresCluster()  # created, not started: nothing listens on its port yet
    store = ExperimentStore(cluster.url)
    log = PredictionLog(store, queue_rows=100, flush_s=0.05)
    try:
        for outage in range(2):
            before = dropped("store_error")
            log.submit([prediction_row(prediction(f"down{outage}-{i}")) for i in range(3)])
            wait_for(lambda before=before: dropped("store_error") - before == 3, "counted as dropped")
            status = log.status()
            assert not status["ok"] and "unavailable" in status["last_error"] and status["dropped"] >= 3
            assert not store.healthy()[0]
            cluster.start()
            log.submit([prediction_row(prediction(f"up{outage}-{i}")) for i in range(4)])
            wait_for(lambda: log.status()["ok"] and log.status()["pending"] == 0, "written again")
            assert count(store, PREDICTIONS) == 4 * (outage + 1)
            assert store.healthy()[0]
            cluster.stop()
    finally:
        log.close()
        store.close()
        cluster.remove()
