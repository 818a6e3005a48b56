"""The experiments in force, in the experiment store (migration 0004): the source of truth while serving.

config.yaml declares the experiments a deployment starts with; every live change (an admin's weights,
a promote, a rollback, a rollout step, a variant added or removed) is written here, with its version,
and every worker (and every replica sharing the store) follows it.

Which wins: each row keeps ``declared``, the hash of the config.yaml declaration it was last seeded
from. An experiment of the file without a row is seeded from it; a row whose ``declared`` is the hash
of the file's declaration keeps its live changes (the store wins); a row whose ``declared`` differs is
overwritten by the file (it was edited: the file wins). Rows the file does not name (experiments
created live) are kept. Every write is compare-and-set on ``version``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, NamedTuple
from collections.abc import Mapping

import sqlalchemy as sa

from common.config import Experiment
from experiments.store import METADATA, ExperimentStore

UNDECLARED = ""
"""``declared`` of an experiment created live: no declaration of the file hashes to it."""

EXPERIMENT_STATE = sa.Table(
    "experiment_state", METADATA,
    sa.Column("model", sa.Text, primary_key=True),
    sa.Column("document", sa.JSON, nullable=False),  # common.config.Experiment, model_dump(mode="json")
    sa.Column("declared", sa.Text, nullable=False),  # SHA-256 of the config.yaml declaration last applied
    sa.Column("version", sa.Integer, nullable=False),  # raised by every change
    sa.Column("source", sa.Text, nullable=False),  # config | admin | promote | rollback | rollout
    sa.Column("updated_at", sa.Double, nullable=False),
)


@dataclass(frozen=True)
class State:
    """One experiment's row."""

    document: dict[str, Any]  # common.config.Experiment, model_dump(mode="json")
    declared: str
    version: int
    source: str
    updated_at: float


class Change(NamedTuple):
    """A change :meth:`StateStore.reconcile` applied, for the weight history."""

    model: str
    before: dict[str, Any] | None  # None: the experiment was seeded
    after: dict[str, Any]
    version: int
    reason: str


class Conflict(Exception):
    """Another writer changed the experiment since it was read: read it again and retry."""


class StateStore:
    def __init__(self, store: ExperimentStore):
        self.store = store

    # -- reading --------------------------------------------------------------------------------------

    def states(self) -> dict[str, State]:
        """Every experiment in force, by logical model."""
        with self.store._read() as conn:
            return {row.model: _state(row) for row in conn.execute(sa.select(EXPERIMENT_STATE))}

    def get(self, model: str) -> State | None:
        with self.store._read() as conn:
            row = conn.execute(sa.select(EXPERIMENT_STATE).where(EXPERIMENT_STATE.c.model == model)).first()
        return None if row is None else _state(row)

    def versions(self) -> dict[str, int]:
        """Each experiment's version: the cheap poll that tells a worker whether to read the rest."""
        s = EXPERIMENT_STATE.c
        with self.store._read() as conn:
            return {model: int(version) for model, version in conn.execute(sa.select(s.model, s.version))}

    # -- writing --------------------------------------------------------------------------------------

    def reconcile(self, declared: Mapping[str, Experiment], now: float | None = None) -> list[Change]:
        """Apply config.yaml's declarations by the rule in the module docstring: a missing row is seeded,
        a row seeded from another declaration is overwritten, the rest is kept. Compare-and-set, so of
        several workers reconciling at once exactly one applies each change: the changes it applied."""
        now = time.time() if now is None else now
        s = EXPERIMENT_STATE.c
        changes: list[Change] = []
        with self.store._write() as conn:
            rows = {row.model: row
                    for row in conn.execute(sa.select(s.model, s.document, s.declared, s.version))}
            for model, experiment in declared.items():
                digest, document = declaration_hash(experiment), experiment.model_dump(mode="json")
                row = rows.get(model)
                values = {"document": document, "declared": digest, "source": "config", "updated_at": now}
                if row is None:
                    done = conn.execute(self.store._insert(EXPERIMENT_STATE).on_conflict_do_nothing()
                                        .values(model=model, version=1, **values)
                                        .returning(s.version)).first()
                    change = Change(model, None, document, 1, "seeded from config.yaml")
                elif row.declared != digest:
                    done = conn.execute(sa.update(EXPERIMENT_STATE)
                                        .where(s.model == model, s.version == row.version)
                                        .values(version=row.version + 1, **values)
                                        .returning(s.version)).first()
                    change = Change(model, dict(row.document), document, row.version + 1,
                                    "config.yaml changed")
                else:
                    continue
                if done is not None:  # RETURNING, not rowcount: psycopg reports -1 for some statements
                    changes.append(change)
        return changes

    def write(self, model: str, document: Mapping[str, Any], version: int | None, source: str,
              now: float | None = None) -> int:
        """Write one experiment if its row is still at ``version`` (None: if it has no row yet, creating an
        experiment no declaration names): the new version, or :class:`Conflict` to read again and retry."""
        now = time.time() if now is None else now
        values = {"document": dict(document), "source": source, "updated_at": now}
        with self.store._write() as conn:
            if version is None:
                done = conn.execute(self.store._insert(EXPERIMENT_STATE).on_conflict_do_nothing()
                                    .values(model=model, version=1, declared=UNDECLARED, **values)
                                    .returning(EXPERIMENT_STATE.c.version)).first()
            else:
                done = conn.execute(sa.update(EXPERIMENT_STATE)
                                    .where(EXPERIMENT_STATE.c.model == model,
                                           EXPERIMENT_STATE.c.version == version)
                                    .values(version=version + 1, **values)
                                    .returning(EXPERIMENT_STATE.c.version)).first()
        if done is None:
            raise Conflict(f"experiment {model!r} " + ("was created meanwhile" if version is None
                                                        else f"changed since version {version}"))
        return int(done.version)


def declaration_hash(experiment: Experiment) -> str:
    """SHA-256 of the canonical JSON of a declaration: the fields config.yaml sets (so a default added to
    the code later is no edit of the file), sorted, numbers as the validated model holds them."""
    canonical = json.dumps(experiment.model_dump(mode="json", exclude_unset=True), sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _state(row: Any) -> State:
    return State(dict(row.document), row.declared, int(row.version), row.source, float(row.updated_at))
