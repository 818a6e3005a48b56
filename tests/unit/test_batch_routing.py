"""Issue 17: a batch job routes with the experiment in force online (``batch/routing.py``): the experiment
store's row by the service's own rule of which wins, else config.yaml's declaration, saying why. On a
real SQLite store file; no service."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.runtime.migration import MigrationContext

from batch.routing import in_force
from common import config
from common.config import STORE_URL_ENV, Config, Experiment
from experiments.router import Router
from experiments.statestore import StateStore
from experiments.store import ExperimentStore

MODEL = "wine"
UNREACHABLE = "postgresql://bundle@127.0.0.1:1/bundle"
"""Nothing listens on port 1: the connection is refused at once."""


@pytest.fixture
def settings() -> Config:
    return config.load()


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: Config) -> StateStore:
    url = f"sqlite:///{tmp_path / 'experiments.sqlite'}"
    monkeypatch.setenv(STORE_URL_ENV, url)
    states = StateStore(ExperimentStore(url))
    states.reconcile(settings.experiments)  # what a starting service does
    return states


def weights(settings: Config) -> dict[str, float]:
    return {v.name: v.weight for v in settings.experiments[MODEL].variants}


def test_an_admins_weights_in_the_store_are_the_ones_routed_with(store: StateStore, settings: Config) -> None:
    seeded = in_force(MODEL, settings)
    assert seeded.source.startswith("experiment store sqlite:///") and "version 1, last set by config" in seeded.source
    assert seeded.settings.experiments[MODEL] == settings.experiments[MODEL]
    row = store.get(MODEL)
    assert row is not None
    changed = {**row.document, "variants": [{**v, "weight": 9 if i == 0 else 1}
                                            for i, v in enumerate(row.document["variants"])]}
    store.write(MODEL, changed, row.version, "admin")
    routed = in_force(MODEL, settings)
    assert "version 2, last set by admin" in routed.source
    first, second = (v.name for v in settings.experiments[MODEL].variants)
    assert weights(routed.settings) == {first: 9, second: 1}
    assert weights(settings) == {first: 1, second: 1}, "the file's configuration is left as it is"
    assert routed.settings.experiments["cancer"] == settings.experiments["cancer"]
    users = [f"user-{i}" for i in range(2000)]
    online, declared = Router(routed.settings.experiments), Router(settings.experiments)
    moved = sum(online.route(MODEL, u).variant.name != declared.route(MODEL, u).variant.name for u in users)
    assert moved > 0


def test_an_edited_declaration_wins_as_it_does_in_the_service(store: StateStore, settings: Config) -> None:
    document = settings.experiments[MODEL].model_dump(mode="json", exclude_unset=True)
    document["variants"][0]["weight"] = 3
    experiment = Experiment.model_validate(document)
    edited = settings.model_copy(update={"experiments": {**settings.experiments, MODEL: experiment}})
    routed = in_force(MODEL, edited)
    assert routed.source.startswith("config.yaml (its declaration of 'wine' was edited")
    assert routed.settings is edited


def test_an_experiment_created_live_is_found_in_the_store(store: StateStore, settings: Config) -> None:
    document = {"salt": "live", "variants": [{"name": "only", "model": "wine_sklearn:v1", "weight": 1}]}
    store.write("wine-live", document, None, "admin")
    routed = in_force("wine-live", settings)
    assert routed.source.startswith("experiment store") and "wine-live" not in settings.experiments
    assert routed.settings.experiments["wine-live"].variants[0].name == "only"


def test_without_a_store_row_or_database_config_yaml_routes_and_says_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: Config) -> None:
    missing = tmp_path / "none.sqlite"
    monkeypatch.setenv(STORE_URL_ENV, f"sqlite:///{missing}")
    routed = in_force(MODEL, settings)
    assert routed.settings is settings and routed.source.startswith("config.yaml (no experiment store at")
    assert not missing.exists(), "a job does not create an empty store"
    empty = f"sqlite:///{tmp_path / 'empty.sqlite'}"
    ExperimentStore.connect(empty).close()
    monkeypatch.setenv(STORE_URL_ENV, empty)
    assert "has no row for 'wine'" in in_force(MODEL, settings).source
    monkeypatch.setenv(STORE_URL_ENV, UNREACHABLE)
    down = in_force(MODEL, settings)
    assert down.settings is settings
    assert down.source.startswith("config.yaml (could not read the experiments in force: experiment store")


def test_a_job_never_upgrades_the_services_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 settings: Config) -> None:
    """A store an older service runs on (its schema before live experiment state): the job routes with
    config.yaml and leaves the schema as the service has it."""
    url = f"sqlite:///{tmp_path / 'older.sqlite'}"
    older = ExperimentStore(url)
    older.migrate("0003")
    older.close()
    monkeypatch.setenv(STORE_URL_ENV, url)
    routed = in_force(MODEL, settings)
    assert routed.settings is settings and routed.source.startswith("config.yaml (could not read")
    reader = ExperimentStore(url, migrate=False)
    with reader.engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == "0003"
    reader.close()
