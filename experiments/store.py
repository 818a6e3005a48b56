"""The experiment store: the prediction log, shadow answers, feedback, weight changes and decisions.

One code path for SQLite (the default, a WAL-mode file beside the model store) and PostgreSQL (a
plain ``postgresql://`` URL is run with psycopg 3), on SQLAlchemy Core. The schema is versioned with
Alembic (``experiments/migrations``): migrations run before the first use, serialized between
processes (a file lock beside the SQLite file, an advisory lock on PostgreSQL), so two workers
starting at once, or a store written by an older version, are upgraded, never dropped.

A store built while its database is down still answers ``healthy()``; every other call then raises
:class:`StoreUnavailable`, and works again (migrating first if needed) when the database returns.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import operator
import threading
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import filelock
import numpy as np
import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, make_url

from common.metrics import STORE_UP
from experiments import outcomes

MIGRATIONS = Path(__file__).with_name("migrations")
SQLITE_BUSY_TIMEOUT_S = 10.0  # how long a writer waits for another process's write lock on the SQLite file
MIGRATION_WAIT_S = 120.0  # how long a starting process waits for another one's migration
PG_CONNECT_TIMEOUT_S = 5  # a PostgreSQL that does not answer fails a call after this, not the OS's TCP timeout
MIGRATION_LOCK = 0x62756E646C65  # PostgreSQL advisory lock keys ("bundle" in ASCII, and the next one)
FEEDBACK_LOCK = MIGRATION_LOCK + 1
SQLITE_ROWS_PER_INSERT = 512  # the largest multi-row INSERT: 17 columns x 512 rows, far below SQLite's 32,766 parameters
LOOKUP_CHUNK = 1000  # ids per IN (...) lookup: far below SQLite's bound-parameter limit
PREDICTION_ID_MAX = 64
_READ = "bundle_read"  # execution option: an SQLite read transaction (deferred; the default is IMMEDIATE)

METADATA = sa.MetaData()

PREDICTIONS = sa.Table(
    "predictions", METADATA,
    sa.Column("prediction_id", sa.String(PREDICTION_ID_MAX), primary_key=True),
    sa.Column("client_id", sa.Text),
    sa.Column("served_at", sa.Double, nullable=False, index=True),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("variant", sa.Text, nullable=False),
    sa.Column("model_tag", sa.Text, nullable=False),
    sa.Column("pinned", sa.Boolean, nullable=False),
    sa.Column("epoch", sa.Text, nullable=False),  # the weights in force: experiments.router.epoch
    sa.Column("user_key", sa.Text),
    # A prediction without a user: its request's first prediction id, the unit the router randomized
    # (every row of such a request goes to one variant drawn at random).
    sa.Column("request_id", sa.String(PREDICTION_ID_MAX)),
    sa.Column("api_key", sa.Text),
    sa.Column("endpoint", sa.Text, nullable=False),
    sa.Column("label", sa.Text, nullable=False),
    sa.Column("label_index", sa.Integer, nullable=False),
    sa.Column("top_probability", sa.Double, nullable=False),
    sa.Column("probabilities", sa.JSON, nullable=False),
    sa.Column("latency_ms", sa.Double, nullable=False),
    sa.Index("ix_predictions_model_served_at", "model", "served_at"),
    # Only the predictions with a client id (feedback's ``client_id IN (...)`` implies it): the others,
    # most of them, cost the log writer no index entry (migration 0007).
    sa.Index("ix_predictions_client_id", "client_id", sqlite_where=sa.text("client_id IS NOT NULL"),
             postgresql_where=sa.text("client_id IS NOT NULL")),
)
SHADOW = sa.Table(
    "shadow_predictions", METADATA,
    sa.Column("prediction_id", sa.String(PREDICTION_ID_MAX), primary_key=True),
    sa.Column("served_at", sa.Double, nullable=False, index=True),
    sa.Column("variant", sa.Text, nullable=False),
    sa.Column("model_tag", sa.Text, nullable=False),
    sa.Column("label", sa.Text, nullable=False),
    sa.Column("label_index", sa.Integer, nullable=False),
    sa.Column("probabilities", sa.JSON, nullable=False),
)
FEEDBACK = sa.Table(
    "feedback", METADATA,
    sa.Column("prediction_id", sa.String(PREDICTION_ID_MAX), primary_key=True),
    sa.Column("label", sa.Text),
    sa.Column("label_index", sa.Integer),
    sa.Column("reward", sa.Double),
    # The answer scored against the label once, when it arrives (experiments.outcomes.row_scores), so
    # that reports never read the probability vectors back.
    sa.Column("log_loss", sa.Double),
    sa.Column("brier", sa.Double),
    sa.Column("received_at", sa.Double, nullable=False),
    sa.Column("corrections", sa.Integer, nullable=False),
)
WEIGHT_CHANGES = sa.Table(
    "weight_changes", METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Double, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("old_weights", sa.JSON, nullable=False),
    sa.Column("new_weights", sa.JSON, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Index("ix_weight_changes_model_at", "model", "at"),
)
DECISIONS = sa.Table(
    "decisions", METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Double, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("candidate", sa.Text, nullable=False),
    sa.Column("verdict", sa.Text, nullable=False),
    sa.Column("detail", sa.JSON, nullable=False),
    sa.Index("ix_decisions_model_at", "model", "at"),
)


class PredictionRow(NamedTuple):
    """One row of ``predictions`` in its column order, ``probabilities`` as JSON text: what the log writer
    builds for each answer (``experiments.records``), straight into the insert's parameters."""

    prediction_id: str
    client_id: str | None
    served_at: float
    model: str
    variant: str
    model_tag: str
    pinned: bool
    epoch: str
    user_key: str | None
    request_id: str | None
    api_key: str | None
    endpoint: str
    label: str
    label_index: int
    top_probability: float
    probabilities: str
    latency_ms: float


if PredictionRow._fields != tuple(PREDICTIONS.columns.keys()):
    raise ImportError("PredictionRow must list the predictions table's columns in their order")

# A logged row may leave these out.
PREDICTION_DEFAULTS: dict[str, Any] = {"client_id": None, "pinned": False, "epoch": "", "user_key": None,
                                       "request_id": None, "api_key": None}
FEEDBACK_FIELDS = frozenset({"prediction_id", "id", "label", "reward"})


class StoreUnavailable(Exception):
    """The database cannot be reached (or is locked for too long): a temporary condition."""

    status = 503

    def body(self) -> dict[str, Any]:
        return {"error": str(self)}


def _unit() -> sa.ColumnElement:
    """A prediction's randomization unit: its user, else its request, else (rows logged before
    requests were) the prediction itself."""
    p = PREDICTIONS.c
    return sa.func.coalesce(p.user_key, p.request_id, p.prediction_id)


def user_key(user_id: str | None, hashed: bool) -> str | None:
    """What the log keeps of a user id: the id, or its SHA-256 (hex) so that no raw id is stored."""
    if user_id is None:
        return None
    return hashlib.sha256(user_id.encode()).hexdigest() if hashed else user_id


@dataclass(frozen=True)
class Joined:
    """The labelled live predictions of one model, one array entry per prediction, oldest first."""

    prediction_id: np.ndarray
    variant: np.ndarray
    model_tag: np.ndarray
    pinned: np.ndarray  # bool: the request chose the variant (not part of the randomized split)
    user_key: np.ndarray  # str or None
    unit: np.ndarray  # the randomization unit (``_unit``): the cluster of the cluster-robust variance
    served_at: np.ndarray
    labelled_at: np.ndarray
    predicted: np.ndarray
    actual: np.ndarray  # -1 where the feedback is a reward only
    reward: np.ndarray  # nan where there is none
    log_loss: np.ndarray  # nan where unscored (no class label)
    brier: np.ndarray
    latency_ms: np.ndarray

    def __len__(self) -> int:
        return len(self.prediction_id)


@dataclass(frozen=True)
class JoinedShadow:
    """Labelled predictions that have a shadow answer: live and shadow graded by the same outcome."""

    prediction_id: np.ndarray
    variant: np.ndarray
    shadow_variant: np.ndarray
    unit: np.ndarray
    served_at: np.ndarray
    predicted: np.ndarray
    shadow_predicted: np.ndarray
    actual: np.ndarray  # -1 where the feedback is a reward only

    def __len__(self) -> int:
        return len(self.prediction_id)


@dataclass(frozen=True)
class BulkInsert:
    """One table's ``INSERT ... ON CONFLICT DO NOTHING`` compiled for the store's database, and whether
    its parameters are positional (SQLite: a row's values in the table's column order) or named."""

    sql: str
    positional: bool

    @functools.cache  # noqa: B019 - a few sizes per table (powers of two), for the store's life
    def rows_sql(self, count: int) -> str:
        """The same insert of ``count`` rows in one statement (SQLite's multi-row VALUES), built once per
        size."""
        head, _, rest = self.sql.partition(" VALUES ")
        row, _, tail = rest.partition(")")
        return f"{head} VALUES {', '.join([row + ')'] * count)}{tail}"


class ExperimentStore:
    """The experiment store at ``url`` (``sqlite:///path`` or ``postgresql://...``). Building it does
    not touch the database; the first call migrates it (or :meth:`connect` does so at once).
    ``engine`` is the SQLAlchemy engine, for tools and tests that read the tables directly."""

    def __init__(self, url: str, migrate: bool = True):
        """``migrate=False``: a reader of a store the service owns (a batch job), which never changes its
        schema: a job from a newer checkout must not upgrade the database under a running service (and
        its code may be a zip, as spark-submit ships it, where Alembic cannot read the migrations)."""
        parsed = make_url(url)
        if parsed.drivername in ("postgres", "postgresql"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        self.backend = parsed.get_backend_name()
        self.url = parsed.render_as_string(hide_password=True)
        self._sqlite_file: Path | None = None
        if self.backend == "postgresql":
            self.engine = sa.create_engine(parsed, pool_pre_ping=True,
                                            connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S})
        elif self.backend == "sqlite":
            if not parsed.database or parsed.database == ":memory:":
                raise ValueError(f"{self.url}: the experiment store needs a file, shared by every worker")
            self._sqlite_file = Path(parsed.database)
            self._sqlite_file.parent.mkdir(parents=True, exist_ok=True)
            self.engine = sa.create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
            sa.event.listen(self.engine, "connect", _sqlite_connect)
            sa.event.listen(self.engine, "begin", _sqlite_begin)
        else:
            raise ValueError(f"{self.url}: the experiment store runs on sqlite or postgresql")
        self._insert = postgresql.insert if self.backend == "postgresql" else sqlite.insert
        self._bulk: dict[str, BulkInsert] = {}
        self._migrated = not migrate
        self._migrating = threading.Lock()
        self._batch = threading.local()

    @classmethod
    def connect(cls, url: str) -> ExperimentStore:
        """A store migrated now: raises :class:`StoreUnavailable` if the database cannot be reached."""
        store = cls(url)
        store.migrate()
        return store

    def close(self) -> None:
        self.engine.dispose()

    # -- schema ---------------------------------------------------------------------------------------

    def migrate(self, revision: str = "head") -> None:
        """Upgrade the schema to the newest version (or ``revision``, to test upgrades): idempotent, one
        process at a time."""
        lock: AbstractContextManager[Any] = nullcontext()
        if self._sqlite_file is not None:
            lock = filelock.FileLock(f"{self._sqlite_file}.lock", timeout=MIGRATION_WAIT_S)
        with self._unavailable(), lock, self.engine.begin() as conn:
            if self.backend == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK)))
            config = AlembicConfig()
            config.set_main_option("script_location", str(MIGRATIONS))
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
        self._migrated = True

    def healthy(self) -> tuple[bool, str]:
        """A cheap round trip to the database, for ``/readyz`` detail."""
        try:
            with self._read() as conn:
                conn.execute(sa.select(1))
        except StoreUnavailable as err:
            return False, str(err)
        return True, f"{self.backend} store reachable"

    # -- the prediction log ---------------------------------------------------------------------------

    def insert_predictions(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Log live predictions (keys: the ``predictions`` columns); an id logged before is ignored."""
        self.log_predictions([prediction_row(row) for row in rows])

    def log_predictions(self, rows: Sequence[PredictionRow]) -> None:
        """The log writer's :meth:`insert_predictions`: rows built as tuples in the table's order (a dict
        a row, merged with the defaults and read back in the statement's order, was a quarter of the
        writer's CPU)."""
        self.insert_rows(PREDICTIONS, rows)

    def insert_shadow(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Log shadow answers under their live prediction's id (``served_at`` defaults to now)."""
        if rows:
            now = time.time()
            self.insert_ignoring_duplicates(SHADOW, [
                {"served_at": now, **row, "probabilities": json_floats(row["probabilities"])} for row in rows])

    def insert_ignoring_duplicates(self, table: sa.Table, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert ``rows`` (every column of ``table``, JSON columns already encoded as text), skipping a
        primary key stored before."""
        if rows:
            in_order = operator.itemgetter(*table.columns.keys())
            self.insert_rows(table, [in_order(row) for row in rows])

    def insert_rows(self, table: sa.Table, rows: Sequence[tuple]) -> None:
        """Insert ``rows``, each a tuple of every column of ``table`` in its order (JSON columns already
        encoded as text), skipping a primary key stored before: the log's bulk write.

        The statement is compiled once per table and the rows go to the driver as they are: SQLAlchemy's
        per-row parameter processing cost the log writer more CPU than SQLite's own insert. On SQLite the
        rows go as multi-row INSERTs: ``executemany`` steps once per row, and the sqlite3 module releases
        the GIL and takes it back around every step, a hand-over with the event loop per logged row."""
        if not rows:
            return
        bulk = self._bulk_insert(table)
        with self._write() as conn:
            if not bulk.positional:  # named parameters (psycopg, which pipelines an executemany)
                keys = table.columns.keys()
                conn.exec_driver_sql(bulk.sql, [dict(zip(keys, row)) for row in rows])
                return
            start = 0
            while start < len(rows):
                # A power of two rows per statement: sqlite3 keeps every distinct statement text prepared
                # (128 per connection, ~1 MiB for 500 rows). Flushes of any size grew a process by 71 MiB
                # in 400 flushes; ten sizes per table bound it.
                size = min(SQLITE_ROWS_PER_INSERT, 1 << ((len(rows) - start).bit_length() - 1))
                flat = tuple(itertools.chain.from_iterable(rows[start:start + size]))
                conn.exec_driver_sql(bulk.rows_sql(size), flat)
                start += size

    def _bulk_insert(self, table: sa.Table) -> BulkInsert:
        if table.name not in self._bulk:
            keys = table.columns.keys()
            compiled = self._insert(table).on_conflict_do_nothing().compile(dialect=self.engine.dialect,
                                                                            column_keys=keys)
            order = compiled.positiontup
            if order and list(order) != keys:  # rows are tuples in the table's order: the statement must be too
                raise RuntimeError(f"{table.name}: the insert's parameters {order} are not the columns {keys}")
            self._bulk[table.name] = BulkInsert(str(compiled), bool(order))
        return self._bulk[table.name]

    # -- feedback -------------------------------------------------------------------------------------

    def apply_feedback(self, items: Sequence[Any], classes_of: Callable[[str], list[str] | None],
                       now: float | None = None) -> list[dict[str, Any]]:
        """Join outcomes to predictions, one answer per item, in one transaction.

        An item names its prediction by ``prediction_id`` or by the client's ``id`` (the newest
        prediction carrying it), and gives a ``label`` (a class name of the predicted model, or its
        index) and/or a finite ``reward``. The same outcome twice is a ``duplicate``; a changed one
        replaces the older and is counted as a correction. Fields an item leaves out are kept.
        """
        now = time.time() if now is None else now
        parsed: list[tuple[str, str, str | int | None, float | None] | str] = [_parse_feedback(i) for i in items]
        wanted = [p for p in parsed if not isinstance(p, str)]
        answers: list[dict[str, Any]] = []
        with self._write(lock=FEEDBACK_LOCK) as conn:
            models = self._lookup(conn, sa.select(PREDICTIONS.c.prediction_id, PREDICTIONS.c.model,
                                                  PREDICTIONS.c.probabilities),
                                  PREDICTIONS.c.prediction_id, [k for f, k, _, _ in wanted if f == "prediction_id"])
            by_client = self._lookup(
                conn, sa.select(PREDICTIONS.c.client_id, PREDICTIONS.c.prediction_id, PREDICTIONS.c.model,
                                PREDICTIONS.c.probabilities)
                .order_by(PREDICTIONS.c.served_at), PREDICTIONS.c.client_id, [k for f, k, _, _ in wanted if f == "id"])
            known = {pid: row.model for pid, row in models.items()}
            known.update({row.prediction_id: row.model for row in by_client.values()})
            answered = {pid: row.probabilities for pid, row in models.items()}
            answered.update({row.prediction_id: row.probabilities for row in by_client.values()})
            stored = self._lookup(conn, sa.select(FEEDBACK), FEEDBACK.c.prediction_id, list(known))
            state = {pid: dict(row._mapping) for pid, row in stored.items()}
            new: set[str] = set()
            changed: set[str] = set()
            classes: dict[str, list[str] | None] = {}
            for item, p in zip(items, parsed):
                if isinstance(p, str):
                    answers.append({**_ids_of(item), "status": "invalid", "reason": p})
                    continue
                field, key, label, reward = p
                pid = key if field == "prediction_id" and key in models else None
                if field == "id" and key in by_client:
                    pid = by_client[key].prediction_id
                if pid is None:
                    answers.append({field: key, "status": "unknown_id"})
                    continue
                answer: dict[str, Any] = {field: key, "prediction_id": pid}
                model = known[pid]
                if model not in classes:
                    classes[model] = classes_of(model)
                current = state.get(pid, {"label": None, "label_index": None, "reward": None, "corrections": 0})
                outcome = {"label": current["label"], "label_index": current["label_index"], "reward": current["reward"]}
                if label is not None:
                    resolved = _resolve_label(label, model, classes[model])
                    if isinstance(resolved, str):
                        answers.append({**answer, "status": "invalid", "reason": resolved})
                        continue
                    outcome["label"], outcome["label_index"] = resolved
                if reward is not None:
                    outcome["reward"] = reward
                replaced = [k for k, v in outcome.items() if v != current[k] and current[k] is not None]
                if pid in state and not any(v != current[k] for k, v in outcome.items()):
                    answers.append({**answer, "status": "duplicate"})
                    continue
                corrections = current["corrections"] + (1 if replaced else 0)
                state[pid] = {"prediction_id": pid, **outcome, **_scored(answered[pid], outcome["label_index"]),
                              "received_at": now, "corrections": corrections}
                (changed if pid in stored else new).add(pid)
                answers.append({**answer, "status": "matched", **({"correction": True} if replaced else {})})
            if new:
                conn.execute(sa.insert(FEEDBACK), [state[pid] for pid in new])
            if changed:
                conn.execute(
                    sa.update(FEEDBACK).where(FEEDBACK.c.prediction_id == sa.bindparam("b_id")).values(
                        label=sa.bindparam("b_label"), label_index=sa.bindparam("b_index"),
                        reward=sa.bindparam("b_reward"), log_loss=sa.bindparam("b_log_loss"),
                        brier=sa.bindparam("b_brier"), received_at=sa.bindparam("b_at"),
                        corrections=sa.bindparam("b_corrections")),
                    [{"b_id": pid, "b_label": s["label"], "b_index": s["label_index"], "b_reward": s["reward"],
                      "b_log_loss": s["log_loss"], "b_brier": s["brier"], "b_at": s["received_at"],
                      "b_corrections": s["corrections"]} for pid in changed
                     for s in (state[pid],)])
        return answers

    @staticmethod
    def _lookup(conn: Connection, query: sa.Select, key: sa.Column, values: list[str]) -> dict[str, sa.Row]:
        """Rows of ``query`` whose ``key`` is among ``values``, by key (the last row wins), in chunks."""
        found: dict[str, sa.Row] = {}
        unique = list(dict.fromkeys(values))
        for start in range(0, len(unique), LOOKUP_CHUNK):
            for row in conn.execute(query.where(key.in_(unique[start:start + LOOKUP_CHUNK]))):
                found[row[0]] = row
        return found

    # -- reading the outcomes -------------------------------------------------------------------------

    def joined(self, model: str, since: float | None = None) -> Joined:
        """The labelled live predictions of ``model`` served at or after ``since``."""
        p, f = PREDICTIONS.c, FEEDBACK.c
        query = (sa.select(p.prediction_id, p.variant, p.model_tag, p.user_key, p.served_at, f.received_at,
                           p.label_index, f.label_index, f.reward, f.log_loss, f.brier, p.latency_ms, p.pinned, _unit())
                 .join_from(PREDICTIONS, FEEDBACK, p.prediction_id == f.prediction_id)
                 .where(*_of_model(model, since)).order_by(p.served_at))
        with self._read() as conn:
            rows = conn.execute(query).all()
        cols = list(zip(*rows)) or [()] * 14
        return Joined(
            prediction_id=np.array(cols[0], dtype=object), variant=np.array(cols[1], dtype=object),
            model_tag=np.array(cols[2], dtype=object), user_key=np.array(cols[3], dtype=object),
            served_at=np.array(cols[4], dtype=float), labelled_at=np.array(cols[5], dtype=float),
            predicted=np.array(cols[6], dtype=np.int64), actual=_indices(cols[7]),
            reward=_floats_or_nan(cols[8]),
            log_loss=_floats_or_nan(cols[9]), brier=_floats_or_nan(cols[10]),
            latency_ms=np.array(cols[11], dtype=float), pinned=np.array(cols[12], dtype=bool),
            unit=np.array(cols[13], dtype=object))

    def joined_shadow(self, model: str, since: float | None = None) -> JoinedShadow:
        """Per labelled prediction of ``model`` that has a shadow answer: both answers and the outcome."""
        p, f, s = PREDICTIONS.c, FEEDBACK.c, SHADOW.c
        query = (sa.select(p.prediction_id, p.variant, s.variant, _unit(), p.served_at, p.label_index,
                           s.label_index, f.label_index)
                 .join_from(PREDICTIONS, FEEDBACK, p.prediction_id == f.prediction_id)
                 .join(SHADOW, s.prediction_id == p.prediction_id)
                 .where(*_of_model(model, since)).order_by(p.served_at))
        with self._read() as conn:
            rows = conn.execute(query).all()
        cols = list(zip(*rows)) or [()] * 8
        return JoinedShadow(
            prediction_id=np.array(cols[0], dtype=object), variant=np.array(cols[1], dtype=object),
            shadow_variant=np.array(cols[2], dtype=object), unit=np.array(cols[3], dtype=object),
            served_at=np.array(cols[4], dtype=float), predicted=np.array(cols[5], dtype=np.int64),
            shadow_predicted=np.array(cols[6], dtype=np.int64), actual=_indices(cols[7]))

    def label_counts(self, model: str, horizon_s: float, now: float | None = None) -> dict[str, dict[str, Any]]:
        """Per variant: predictions served, labelled, pending (no outcome yet, younger than
        ``horizon_s``), expired (none and older), and the median label delay in seconds."""
        now = time.time() if now is None else now
        p, f = PREDICTIONS.c, FEEDBACK.c
        unlabelled_old = sa.and_(f.prediction_id.is_(None), p.served_at < now - horizon_s)
        counts = (sa.select(p.variant, sa.func.count(), sa.func.count(f.prediction_id),
                            sa.func.coalesce(sa.func.sum(sa.case((unlabelled_old, 1), else_=0)), 0))
                  .select_from(PREDICTIONS.outerjoin(FEEDBACK, p.prediction_id == f.prediction_id))
                  .where(p.model == model).group_by(p.variant))
        delays = (sa.select(p.variant, f.received_at - p.served_at)
                  .join_from(PREDICTIONS, FEEDBACK, p.prediction_id == f.prediction_id).where(p.model == model))
        with self._read() as conn:
            out = {variant: {"served": served, "labelled": labelled, "pending": served - labelled - expired,
                             "expired": expired, "median_label_delay_s": None}
                   for variant, served, labelled, expired in conn.execute(counts)}
            by_variant: dict[str, list[float]] = {}
            for variant, delay in conn.execute(delays):
                by_variant.setdefault(variant, []).append(delay)
        for variant, values in by_variant.items():
            out[variant]["median_label_delay_s"] = float(np.median(values))
        return out

    def assigned_units(self, model: str, epoch: str) -> dict[str, int]:
        """Per variant, the randomization units the split sent it under the weights ``epoch``: distinct
        users and requests without a user (``_unit``) of routed (not pinned) predictions."""
        p = PREDICTIONS.c
        query = (sa.select(p.variant, sa.func.count(sa.distinct(_unit())))
                 .where(p.model == model, p.epoch == epoch, sa.not_(p.pinned)).group_by(p.variant))
        with self._read() as conn:
            return {variant: int(n) for variant, n in conn.execute(query)}

    def served_counts(self, model: str, since: float | None = None) -> dict[str, int]:
        """Per variant, the predictions of ``model`` served at or after ``since``, labelled or not."""
        p = PREDICTIONS.c
        query = sa.select(p.variant, sa.func.count()).where(*_of_model(model, since)).group_by(p.variant)
        with self._read() as conn:
            return {variant: int(n) for variant, n in conn.execute(query)}

    def variant_latency(self, model: str, since: float | None = None, quantile: float = 0.95) -> dict[str, float]:
        """Per variant, the ``quantile`` (nearest rank) of the latency in ms over every served prediction."""
        p = PREDICTIONS.c
        where = _of_model(model, since)
        out: dict[str, float] = {}
        with self._read() as conn:
            for variant, n in conn.execute(sa.select(p.variant, sa.func.count()).where(*where).group_by(p.variant)):
                rank = max(math.ceil(quantile * n) - 1, 0)
                out[variant] = conn.scalar(sa.select(p.latency_ms).where(*where, p.variant == variant)
                                           .order_by(p.latency_ms).offset(rank).limit(1))
        return out

    # -- weight changes and decisions -----------------------------------------------------------------

    def record_weight_change(self, model: str, source: str, old: Mapping[str, float], new: Mapping[str, float],
                             reason: str, at: float | None = None) -> None:
        """Remember a change of an experiment's weights (source: admin, promote, rollback, ...)."""
        with self._write() as conn:
            conn.execute(sa.insert(WEIGHT_CHANGES).values(
                at=time.time() if at is None else at, model=model, source=source, old_weights=dict(old),
                new_weights=dict(new), reason=reason))

    def history(self, model: str, limit: int = 100) -> list[dict[str, Any]]:
        """The latest weight changes of ``model``, newest first."""
        return self._newest(WEIGHT_CHANGES, model, limit)

    def record_decision(self, model: str, candidate: str, verdict: str, detail: Mapping[str, Any],
                        at: float | None = None) -> None:
        with self._write() as conn:
            conn.execute(sa.insert(DECISIONS).values(
                at=time.time() if at is None else at, model=model, candidate=candidate, verdict=verdict,
                detail=dict(detail)))

    def decisions(self, model: str, limit: int = 100) -> list[dict[str, Any]]:
        """The latest recorded decisions about ``model``'s candidates, newest first."""
        return self._newest(DECISIONS, model, limit)

    def _newest(self, table: sa.Table, model: str, limit: int) -> list[dict[str, Any]]:
        with self._read() as conn:
            rows = conn.execute(sa.select(table).where(table.c.model == model)
                                .order_by(table.c.id.desc()).limit(limit))
            return [dict(row._mapping) for row in rows]

    # -- retention ------------------------------------------------------------------------------------

    def prune(self, retention_days: float | None, retention_rows: int | None, now: float | None = None) -> int:
        """Remove predictions older than ``retention_days`` or beyond the newest ``retention_rows``
        (ties at the boundary are kept), with their shadow and feedback rows: the rows removed."""
        now = time.time() if now is None else now
        p = PREDICTIONS.c
        with self._write() as conn:
            cutoff = None if retention_days is None else now - retention_days * 86_400
            if retention_rows is not None:
                oldest_kept = conn.scalar(sa.select(p.served_at).order_by(p.served_at.desc())
                                          .offset(retention_rows - 1).limit(1))
                if oldest_kept is not None:
                    cutoff = oldest_kept if cutoff is None else max(cutoff, oldest_kept)
            if cutoff is None:
                return 0
            old = sa.select(p.prediction_id).where(p.served_at < cutoff)
            removed = conn.execute(sa.delete(FEEDBACK).where(FEEDBACK.c.prediction_id.in_(old))).rowcount
            removed += conn.execute(sa.delete(SHADOW).where(SHADOW.c.served_at < cutoff)).rowcount
            removed += conn.execute(sa.delete(PREDICTIONS).where(p.served_at < cutoff)).rowcount
        return removed

    # -- transactions ---------------------------------------------------------------------------------

    def _ready(self) -> None:
        if not self._migrated:
            with self._migrating:
                if not self._migrated:
                    self.migrate()

    @contextmanager
    def _unavailable(self) -> Iterator[None]:
        """Database outages as :class:`StoreUnavailable`, naming the store and the first line of the cause;
        ``bundle_store_up`` says whether the last call reached the store."""
        try:
            yield
        except (exc.OperationalError, exc.InterfaceError, exc.TimeoutError, filelock.Timeout) as err:
            STORE_UP.set(0)
            cause = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
            raise StoreUnavailable(f"experiment store {self.url} unavailable: {cause}") from err
        STORE_UP.set(1)

    @contextmanager
    def batch(self) -> Iterator[None]:
        """One write transaction for every write this thread makes inside it: the log writer's flush
        (predictions, samples, running totals) commits once, not once per table, and all or nothing."""
        with self._write() as conn:
            self._batch.conn = conn
            try:
                yield
            finally:
                self._batch.conn = None

    @contextmanager
    def _write(self, lock: int | None = None) -> Iterator[Connection]:
        """A write transaction (IMMEDIATE on SQLite: no lock upgrade that could fail midway), optionally
        serialized between processes by a PostgreSQL advisory lock (SQLite's write lock already is);
        inside :meth:`batch`, the batch's."""
        joined = getattr(self._batch, "conn", None)
        with nullcontext(joined) if joined is not None else self._begin() as conn:
            if lock is not None and self.backend == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(lock)))
            yield conn

    @contextmanager
    def _begin(self) -> Iterator[Connection]:
        with self._unavailable():
            self._ready()
            with self.engine.begin() as conn:
                yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._unavailable():
            self._ready()
            with self.engine.connect() as conn:
                conn.execution_options(**{_READ: True})
                with conn.begin():
                    yield conn


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    """WAL lets readers run beside the writer; transactions are begun by :func:`_sqlite_begin`."""
    dbapi_connection.isolation_level = None
    dbapi_connection.execute("PRAGMA journal_mode=WAL")
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN DEFERRED" if conn.get_execution_options().get(_READ) else "BEGIN IMMEDIATE")


def _of_model(model: str, since: float | None) -> list[sa.ColumnElement[bool]]:
    where = [PREDICTIONS.c.model == model]
    if since is not None:
        where.append(PREDICTIONS.c.served_at >= since)
    return where


def prediction_row(row: Mapping[str, Any]) -> PredictionRow:
    """A live prediction given by column (``probabilities`` a vector, optional columns left out) as the
    log writes it."""
    return PredictionRow(**{**PREDICTION_DEFAULTS, **row, "probabilities": json_floats(row["probabilities"])})


def json_floats(values: Iterable[Any]) -> str:
    """A vector as the JSON text a JSON column holds (what SQLAlchemy's JSON type would write).

    For finite floats ``repr`` of the list is that very text (each float's shortest round-trip digits,
    ``", "`` between them) for about 60% of ``json.dumps``' cost a call, which the log writer pays per row;
    a vector with a non-finite value (or whose sum overflows) goes through ``json.dumps``."""
    floats = [float(v) for v in values]
    return repr(floats) if math.isfinite(sum(floats)) else json.dumps(floats)


FLOAT32_DIGITS = 9
"""Significant digits that give back every float32 exactly (IEEE 754's round-trip bound for binary32)."""


def json_float32(values: Sequence[float]) -> str:
    """A float32 vector (a runtime's probabilities, a schema's input row) as JSON text at its own precision.

    ``repr`` of the float64 each float32 widens to spells out its binary noise (0.30000001192092896):
    17 digits where 9 give the float32 back, at three times the cost (1.3 against 0.4 µs for 3 classes),
    which the log writer pays per row, and 60% more bytes stored. A vector with a non-finite value goes
    through ``json.dumps``, as in :func:`json_floats`."""
    if not math.isfinite(sum(values)):
        return json_floats(values)
    return _float32_format(len(values)) % tuple(values)


@functools.cache
def _float32_format(length: int) -> str:
    return "[" + ", ".join([f"%.{FLOAT32_DIGITS}g"] * length) + "]"


def _scored(probabilities: Sequence[float], label_index: int | None) -> dict[str, float | None]:
    """The answer's log loss and Brier score against the true class (None without a class label)."""
    if label_index is None:
        return {"log_loss": None, "brier": None}
    scores = outcomes.row_scores(np.asarray([probabilities], dtype=float), np.asarray([label_index]))
    return {name: float(value[0]) if np.isfinite(value[0]) else None for name, value in scores.items()}


def _floats_or_nan(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _indices(values: Sequence[int | None]) -> np.ndarray:
    return np.array([-1 if v is None else v for v in values], dtype=np.int64)


def _ids_of(item: Any) -> dict[str, Any]:
    return {k: item[k] for k in ("prediction_id", "id") if isinstance(item, dict) and k in item}


def _parse_feedback(item: Any) -> tuple[str, str, str | int | None, float | None] | str:
    """(id field, id, label, reward) of a feedback item, or why it is invalid."""
    if not isinstance(item, dict):
        return "an item is an object with prediction_id or id, and label and/or reward"
    unknown = sorted(set(item) - FEEDBACK_FIELDS, key=str)
    if unknown:
        return f"unknown field(s) {unknown}: expected prediction_id or id, and label and/or reward"
    fields = [k for k in ("prediction_id", "id") if k in item]
    if len(fields) != 1:
        return "give exactly one of prediction_id or id"
    key = item[fields[0]]
    if isinstance(key, int) and not isinstance(key, bool):
        key = str(key)
    if not isinstance(key, str) or not key:
        return f"{fields[0]} must be a non-empty string"
    label, reward = item.get("label"), item.get("reward")
    if label is None and reward is None:
        return "give a label, a reward or both"
    if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
        return "label must be a class name or its index"
    if reward is not None:
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
            return "reward must be a finite number"
        reward = float(reward)
    return fields[0], key, label, reward


def _resolve_label(label: str | int, model: str, classes: list[str] | None) -> tuple[str, int] | str:
    """(class name, index) of a label given as either, or why it is not one of the model's classes."""
    if classes is None:
        return f"the classes of model {model!r} are not known to this service"
    if isinstance(label, int):
        if 0 <= label < len(classes):
            return classes[label], label
        return f"label index {label} is out of range: expected 0..{len(classes) - 1} for {classes}"
    if label in classes:
        return label, classes.index(label)
    return f"unknown label {label!r}: expected one of {classes} (or its index)"
