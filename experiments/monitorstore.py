"""The monitoring tables of the experiment store (migration 0003): sampled inputs, drift checks, leases.

Kept beside ``experiments/store.py`` rather than in it, on the same engine and the same transactions
(so the same migrations, outage handling and SQLite/PostgreSQL code path), reading the prediction log
it shares for the dashboard's time series.
"""

from __future__ import annotations

import time
from typing import Any
from collections.abc import Mapping, Sequence

import numpy as np
import sqlalchemy as sa

from experiments.store import (
    FEEDBACK,
    METADATA,
    MIGRATION_LOCK,
    PREDICTION_ID_MAX,
    PREDICTIONS,
    SHADOW,
    ExperimentStore,
    json_float32,
)

LEASE_LOCK = MIGRATION_LOCK + 2  # PostgreSQL advisory lock serializing lease takeovers

SAMPLES = sa.Table(
    "input_samples", METADATA,
    sa.Column("prediction_id", sa.String(PREDICTION_ID_MAX), primary_key=True),
    sa.Column("served_at", sa.Double, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("variant", sa.Text, nullable=False),
    sa.Column("model_tag", sa.Text, nullable=False),
    sa.Column("inputs", sa.JSON, nullable=False),
    sa.Index("ix_input_samples_model_served_at", "model", "served_at"),
)
CHECKS = sa.Table(
    "drift_checks", METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Double, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("detail", sa.JSON, nullable=False),
    sa.Index("ix_drift_checks_model_at", "model", "at"),
)
FEATURES = sa.Table(
    "drift_features", METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("check_id", sa.Integer, nullable=False),
    sa.Column("at", sa.Double, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("variant", sa.Text, nullable=False),
    sa.Column("feature", sa.Text, nullable=False),
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("psi", sa.Double),
    sa.Column("statistic", sa.Double),
    sa.Column("p_value", sa.Double),
    sa.Column("p_adjusted", sa.Double),
    sa.Column("drift", sa.Boolean, nullable=False),
    sa.Index("ix_drift_features_model_at", "model", "at"),
)
LEASES = sa.Table(
    "leases", METADATA,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("holder", sa.Text, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=False),
)
FEATURE_COLUMNS = ("variant", "feature", "rows", "psi", "statistic", "p_value", "p_adjusted", "drift")


class MonitorStore:
    def __init__(self, store: ExperimentStore):
        self.store = store

    # -- samples --------------------------------------------------------------------------------------

    def insert_samples(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Sampled inputs (``inputs``: an array, flattened here, in the log's writer thread), kept at float32,
        the precision the runtimes are given."""
        if rows:
            self.store.insert_ignoring_duplicates(SAMPLES, [
                {**row, "inputs": json_float32(np.asarray(row["inputs"], dtype=np.float32).ravel().tolist())}
                for row in rows])

    def samples(self, model: str, variant: str, since: float, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """The newest ``limit`` sampled inputs of a variant served at or after ``since`` (flat rows), and
        the predicted class index and top probability of every logged answer in the same window."""
        s, p = SAMPLES.c, PREDICTIONS.c
        with self.store._read() as conn:
            inputs = conn.execute(sa.select(s.inputs).where(s.model == model, s.variant == variant, s.served_at >= since)
                                  .order_by(s.served_at.desc()).limit(limit)).scalars().all()
            answers = conn.execute(sa.select(p.label_index, p.top_probability)
                                   .where(p.model == model, p.variant == variant, p.served_at >= since)
                                   .order_by(p.served_at.desc()).limit(limit)).all()
        flat = np.array(inputs, dtype=float).reshape(len(inputs), -1) if inputs else np.empty((0, 0))
        return flat, np.array(answers, dtype=float).reshape(len(answers), 2)

    # -- drift checks ---------------------------------------------------------------------------------

    def record_check(self, model: str, detail: Mapping[str, Any], features: Sequence[Mapping[str, Any]],
                     at: float) -> None:
        with self.store._write() as conn:
            check_id = conn.execute(sa.insert(CHECKS).values(at=at, model=model, detail=dict(detail))
                                    .returning(CHECKS.c.id)).scalar_one()
            if features:
                conn.execute(sa.insert(FEATURES), [{"check_id": check_id, "at": at, "model": model,
                                                    **{k: f[k] for k in FEATURE_COLUMNS}} for f in features])

    def latest_check(self, model: str) -> dict[str, Any] | None:
        with self.store._read() as conn:
            row = conn.execute(sa.select(CHECKS.c.detail).where(CHECKS.c.model == model)
                               .order_by(CHECKS.c.id.desc()).limit(1)).scalar()
        return None if row is None else dict(row)

    def feature_series(self, model: str, since: float) -> list[dict[str, Any]]:
        """Every feature's drift results since ``since``, oldest first: the heat map's cells."""
        f = FEATURES.c
        with self.store._read() as conn:
            rows = conn.execute(sa.select(f.at, *(getattr(f, k) for k in FEATURE_COLUMNS))
                                .where(f.model == model, f.at >= since).order_by(f.at))
            return [dict(r._mapping) for r in rows]

    # -- the dashboard's series -----------------------------------------------------------------------

    def served(self, model: str, since: float, limit: int) -> dict[str, np.ndarray]:
        """The newest ``limit`` logged answers since ``since``: time, variant, latency, pinned."""
        p = PREDICTIONS.c
        with self.store._read() as conn:
            rows = conn.execute(sa.select(p.served_at, p.variant, p.latency_ms, p.pinned)
                                .where(p.model == model, p.served_at >= since)
                                .order_by(p.served_at.desc()).limit(limit)).all()
        cols = list(zip(*rows)) or [()] * 4
        return {"served_at": np.array(cols[0], dtype=float), "variant": np.array(cols[1], dtype=object),
                "latency_ms": np.array(cols[2], dtype=float), "pinned": np.array(cols[3], dtype=bool)}

    def graded(self, model: str, since: float) -> dict[str, np.ndarray]:
        """Every prediction served since ``since`` whose feedback has a class label, oldest first: time,
        variant, top probability and whether it was right."""
        p, f = PREDICTIONS.c, FEEDBACK.c
        with self.store._read() as conn:
            rows = conn.execute(sa.select(p.served_at, p.variant, p.top_probability, p.label_index == f.label_index)
                                .join_from(PREDICTIONS, FEEDBACK, p.prediction_id == f.prediction_id)
                                .where(p.model == model, p.served_at >= since, f.label_index.is_not(None))
                                .order_by(p.served_at)).all()
        cols = list(zip(*rows)) or [()] * 4
        return {"served_at": np.array(cols[0], dtype=float), "variant": np.array(cols[1], dtype=object),
                "confidence": np.array(cols[2], dtype=float), "correct": np.array(cols[3], dtype=bool)}

    def shadow_agreement(self, model: str, since: float) -> dict[str, dict[str, int]]:
        """Per shadow variant: answers compared with the live answer and how many agreed."""
        p, s = PREDICTIONS.c, SHADOW.c
        agree = sa.func.sum(sa.case((p.label_index == s.label_index, 1), else_=0))
        with self.store._read() as conn:
            rows = conn.execute(sa.select(s.variant, sa.func.count(), agree)
                                .join_from(PREDICTIONS, SHADOW, p.prediction_id == s.prediction_id)
                                .where(p.model == model, p.served_at >= since).group_by(s.variant))
            return {variant: {"compared": int(n), "agreed": int(a or 0)} for variant, n, a in rows}

    # -- leases ---------------------------------------------------------------------------------------

    def acquire(self, name: str, holder: str, ttl_s: float, now: float | None = None) -> bool:
        """Take or renew the lease ``name`` for ``ttl_s`` unless another holder's is unexpired: exactly
        one process among all workers and replicas holds it at a time."""
        now = time.time() if now is None else now
        with self.store._write(lock=LEASE_LOCK) as conn:
            current = conn.execute(sa.select(LEASES.c.holder, LEASES.c.expires_at)
                                   .where(LEASES.c.name == name)).first()
            if current is None:
                conn.execute(sa.insert(LEASES).values(name=name, holder=holder, expires_at=now + ttl_s))
                return True
            if current.holder != holder and current.expires_at > now:
                return False
            conn.execute(sa.update(LEASES).where(LEASES.c.name == name)
                         .values(holder=holder, expires_at=now + ttl_s))
            return True

    def prune(self, before: float) -> None:
        """Samples and drift series older than ``before`` (the prediction log's retention)."""
        with self.store._write() as conn:
            conn.execute(sa.delete(SAMPLES).where(SAMPLES.c.served_at < before))
            conn.execute(sa.delete(FEATURES).where(FEATURES.c.at < before))
            conn.execute(sa.delete(CHECKS).where(CHECKS.c.at < before))
