"""Issue 14 (part A): the experiments in force live in the experiment store. Seeding from config.yaml,
which wins (the store, or an edited file), compare-and-set between workers, and a store that goes down,
on a real SQLite file and a real PostgreSQL 15 server; no service."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any
from collections.abc import Callable

import pytest
import yaml

from common import config
from common.config import Experiment
from common.errors import ConflictError, NotFoundError, RequestError
from experiments.ledger import Ledger
from experiments.live import LiveExperiments
from experiments.statestore import Conflict, StateStore, declaration_hash
from experiments.store import StoreUnavailable
from harness.postgres import PostgresCluster

POLL_S = 0.05
WAIT_S = 10  # deadline for a poll to be seen, never a measured duration
CLASSES = {"wine": ["a", "b", "c"], "toy": ["no", "yes"]}
KNOWN = {"wine_a:v1", "wine_b:v1", "wine_c:v1", "toy_a:v1"}
"""The stored model tags ``declare`` accepts: any other is unknown (404), as in the catalogue."""
WINE = {"salt": "wine-1", "variants": [{"name": "a", "model": "wine_a:v1", "weight": 1},
                                       {"name": "b", "model": "wine_b:v1", "weight": 1}]}


def declare(name: str, experiment: Experiment) -> None:
    for v in experiment.variants:
        if v.model not in KNOWN:
            raise NotFoundError("model", f"model {v.model!r} is not in the model store")


class Worker:
    """One worker's LiveExperiments over its own Ledger (and engine) on the shared store; ``ready`` is
    the set of tags loaded in it."""

    def __init__(self, path: Path, url: str, ready: set[str] | None = None):
        settings = config.load(path)
        self.ready = set(KNOWN) if ready is None else ready
        self.ledger = Ledger(settings.store, url, CLASSES)
        self.live = LiveExperiments(path, self.ledger, lambda: (set(self.ready), {}), declare)

    def weights(self, model: str = "wine") -> dict[str, float]:
        return {v.name: v.weight for v in self.live.router.experiment(model).variants}

    def record(self, source: str, reason: str = "") -> Callable[[Experiment | None, Experiment], None]:
        def on_change(before: Experiment | None, after: Experiment) -> None:
            self.ledger.record_change("wine", source, {v.name: v.weight for v in before.variants} if before else {},
                                      {v.name: v.weight for v in after.variants}, reason)
        return on_change


def write_config(path: Path, experiments: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"repository": {"poll_s": POLL_S}, "store": {"log_predictions": False},
                                    "experiments": experiments}))
    return path


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"still not {what} after {WAIT_S} s"
        time.sleep(POLL_S / 2)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'experiments.sqlite'}"
    return request.getfixturevalue("postgres").create_database(f"live_{uuid.uuid4().hex[:12]}")


def changes(worker: Worker, source: str | None = None) -> list[dict[str, Any]]:
    return [c for c in worker.ledger.history("wine", 100) if source is None or c["source"] == source]


def test_the_file_seeds_the_store_and_live_changes_survive_a_restart(tmp_path: Path, url: str) -> None:
    path = write_config(tmp_path / "config.yaml", {"wine": WINE})
    text = path.read_text()
    first = Worker(path, url)
    assert first.live.describe()["wine"] == {"source": "config", "version": 1,
                                             "config": {"declared": True, "matches_store": True}}
    [seeded] = changes(first)
    assert seeded["source"] == "config" and seeded["new_weights"] == {"a": 1, "b": 1}
    first.live.update("wine", {"a": 0}, ..., first.record("admin", "test"))
    assert first.weights() == {"a": 0, "b": 1}
    assert path.read_text() == text, "config.yaml is no longer rewritten"

    restarted = Worker(path, url)  # the file's declaration is the one seeded: the store wins
    assert restarted.weights() == {"a": 0, "b": 1}
    assert restarted.live.describe()["wine"] == {"source": "admin", "version": 2,
                                                 "config": {"declared": True, "matches_store": False}}
    assert [c["source"] for c in changes(restarted)] == ["admin", "config"]


def test_an_edited_file_wins_and_experiments_created_live_are_kept(tmp_path: Path, url: str) -> None:
    path = write_config(tmp_path / "config.yaml", {"wine": WINE})
    worker = Worker(path, url)
    worker.live.update("wine", {"a": 0}, ...)
    worker.live.add_variant("toy", "a", "toy_a:v1", weight=1)
    assert worker.live.router.experiment("toy").salt == "toy"
    edited = {**WINE, "variants": [*WINE["variants"], {"name": "c", "model": "wine_c:v1", "weight": 2}]}
    write_config(path, {"wine": edited})
    wait_for(lambda: worker.weights() == {"a": 1, "b": 1, "c": 2}, "the edited file applied")
    state = StateStore(worker.ledger.store).get("wine")
    assert state is not None and (state.source, state.version) == ("config", 3)
    assert changes(worker, "config")[0]["reason"] == "config.yaml changed"
    assert worker.live.describe()["toy"] == {"source": "admin", "version": 1,
                                             "config": {"declared": False, "matches_store": False}}
    assert Worker(path, url).weights() == {"a": 1, "b": 1, "c": 2}  # and a restart reads the same


def test_an_edit_naming_an_unknown_model_is_not_applied(tmp_path: Path, url: str) -> None:
    path = write_config(tmp_path / "config.yaml", {"wine": WINE})
    worker = Worker(path, url)
    broken = {**WINE, "variants": [{"name": "a", "model": "wine_gone:v1", "weight": 1}]}
    write_config(path, {"wine": broken})
    time.sleep(POLL_S * 6)
    assert worker.weights() == {"a": 1, "b": 1}
    assert StateStore(worker.ledger.store).get("wine").version == 1


def test_two_workers_starting_at_once_seed_once_and_never_both_apply_a_change(tmp_path: Path, url: str) -> None:
    path = write_config(tmp_path / "config.yaml", {"wine": WINE})
    workers: list[Worker] = []
    starts = [threading.Thread(target=lambda: workers.append(Worker(path, url))) for _ in range(2)]
    for thread in starts:
        thread.start()
    for thread in starts:
        thread.join()
    one, two = workers
    assert len(changes(one, "config")) == 1

    def ramp(worker: Worker, weights: list[float]) -> None:
        for w in weights:
            worker.live.update("wine", {"b": w}, ..., worker.record("admin"))

    threads = [threading.Thread(target=ramp, args=(w, [float(i) for i in range(1, 11)])) for w in (one, two)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store = StateStore(one.ledger.store)
    assert store.get("wine").version == 1 + 20, "every change applied once, none lost"
    assert len(changes(one, "admin")) == 20
    for worker in (one, two):
        wait_for(lambda w=worker: w.weights() == {"a": 1, "b": 10}, "both workers following the store")
    with pytest.raises(Conflict):  # a stale version is refused, whoever writes
        store.write("wine", store.get("wine").document, 1, "admin")


def test_variants_are_added_and_removed_by_the_rules(tmp_path: Path, url: str) -> None:
    worker = Worker(write_config(tmp_path / "config.yaml", {"wine": WINE}), url, ready={"wine_a:v1", "wine_b:v1"})
    live = worker.live
    added = live.add_variant("wine", "c", "wine_c:v1", on_change=worker.record("admin"))
    assert [v.weight for v in added.variants] == [1, 1, 0]
    assert changes(worker)[0]["new_weights"] == {"a": 1, "b": 1, "c": 0}
    with pytest.raises(ConflictError):
        live.add_variant("wine", "c", "wine_c:v1")
    with pytest.raises(RequestError, match="salt"):
        live.add_variant("wine", "d", "wine_c:v1", salt="other")
    with pytest.raises(NotFoundError):
        live.add_variant("wine", "d", "wine_gone:v1")
    live.update("wine", {"c": 1}, ...)  # its model is not loaded here: no traffic in this worker
    assert live.router.failed("wine") == {"c": "not loaded in this worker"}
    assert {live.router.route("wine", f"u{i}").variant.name for i in range(200)} == {"a", "b"}
    worker.ready.add("wine_c:v1")
    live.refresh()
    assert {live.router.route("wine", f"u{i}").variant.name for i in range(200)} == {"a", "b", "c"}
    with pytest.raises(ConflictError, match="still has weight"):
        live.remove_variant("wine", "c")
    assert [v.name for v in live.remove_variant("wine", "c", force=True).variants] == ["a", "b"]
    live.update("wine", {"b": 0}, ...)
    live.remove_variant("wine", "b")
    with pytest.raises(ConflictError, match="last variant"):
        live.remove_variant("wine", "a", force=True)
    with pytest.raises(NotFoundError):
        live.remove_variant("wine", "zz")
    with pytest.raises(RequestError, match="weight above 0"):  # a new experiment needs a weighted variant
        live.add_variant("toy", "a", "toy_a:v1")


def test_a_store_that_goes_down_serves_the_last_state_and_refuses_changes(
        tmp_path: Path, postgres: PostgresCluster) -> None:
    url = postgres.create_database(f"down_{uuid.uuid4().hex[:12]}")
    path = write_config(tmp_path / "config.yaml", {"wine": WINE})
    worker = Worker(path, url)
    worker.live.update("wine", {"a": 3}, ...)
    postgres.stop()
    try:
        time.sleep(POLL_S * 4)
        assert worker.weights() == {"a": 3, "b": 1}
        with pytest.raises(StoreUnavailable) as refused:
            worker.live.update("wine", {"a": 0}, ...)
        assert refused.value.status == 503
        starting = Worker(path, url)  # a worker starting meanwhile serves config.yaml
        assert starting.weights() == {"a": 1, "b": 1}
        assert starting.live.describe()["wine"]["version"] == 0
    finally:
        postgres.start()
    wait_for(lambda: starting.weights() == {"a": 3, "b": 1}, "the store's state followed once it is back")
    worker.live.update("wine", {"a": 0}, ...)
    wait_for(lambda: starting.weights() == {"a": 0, "b": 1}, "the change reaching the other worker")


def test_the_declaration_hash_ignores_formatting(tmp_path: Path) -> None:
    one = write_config(tmp_path / "one.yaml", {"wine": WINE})
    two = tmp_path / "two.yaml"
    two.write_text("# a comment\n" + one.read_text().replace("weight: 1", "weight: 1.0"))
    hashed = [declaration_hash(config.load(p).experiments["wine"]) for p in (one, two)]
    assert hashed[0] == hashed[1]
