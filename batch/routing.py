"""The experiment a batch job routes with: the one in force online, so a user gets offline what they get
online after an admin's weight change, a variant added live or a rollout step too.

Online, config.yaml only seeds the experiment store; every worker routes with the store's
``experiment_state`` row (``experiments/live.py``). A job reads the same row, from the store the service
uses (``store.url``, ``BUNDLE_STORE_URL``, else the SQLite file beside the model store:
``Store.resolved_url``), and applies the service's rule of which wins (``experiments/statestore.py``):
a row seeded from the file's declaration as it is now, or created live, is in force; a declaration
edited since wins, as the service applies it on its next look at the file. Without a store file, a row
or a reachable database, the job routes with config.yaml's declaration and says so in its summary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from sqlalchemy.engine import make_url

from common.config import Config, Experiment
from common.store import bentoml_home
from experiments.statestore import StateStore, declaration_hash
from experiments.store import ExperimentStore, StoreUnavailable


@dataclass(frozen=True)
class InForce:
    """A configuration whose experiment of the job's model is the one in force, and where it came from."""

    settings: Config
    source: str
    """In words, for the summary: ``experiment store ...`` or ``config.yaml ...`` with why."""


def in_force(model: str, settings: Config) -> InForce:
    """``settings`` with ``model``'s experiment replaced by the store's row when that row is in force."""
    url = settings.store.resolved_url(Path(bentoml_home()))
    if not _exists(url):
        return InForce(settings, f"config.yaml (no experiment store at {url}: no service has run with this "
                                 "model store; set BUNDLE_STORE_URL or store.url to the service's)")
    try:
        store = ExperimentStore(url, migrate=False)  # the service's store: read, never upgraded
    except ValueError as err:  # neither SQLite nor PostgreSQL: the service would not start either
        return InForce(settings, f"config.yaml (the experiment store is misconfigured: {err})")
    try:
        row = StateStore(store).get(model)
    except StoreUnavailable as err:
        return InForce(settings, f"config.yaml (could not read the experiments in force: {err})")
    finally:
        store.close()
    if row is None:
        return InForce(settings, f"config.yaml (the experiment store {store.url} has no row for {model!r} yet: "
                                 "no service has served it)")
    declared = settings.experiments.get(model)
    if declared is not None and row.declared != declaration_hash(declared):
        return InForce(settings, f"config.yaml (its declaration of {model!r} was edited since the store "
                                 f"{store.url} was seeded: the service applies the file's)")
    experiment = Experiment.model_validate(row.document)
    live = settings.model_copy(update={"experiments": {**settings.experiments, model: experiment}})
    return InForce(live, f"experiment store {store.url} (version {row.version}, last set by {row.source})")


def _exists(url: str) -> bool:
    """False for an SQLite file that is not there: reading it would create an empty store."""
    parsed = make_url(url)
    return parsed.get_backend_name() != "sqlite" or bool(parsed.database and Path(unquote(parsed.database)).exists())
