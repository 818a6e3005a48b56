"""Rows answered per variant, per worker, in the experiment store (migration 0005): the counts the
report and the decision's error guardrail sum over every worker of every replica.

Each worker's Prometheus counters (``bundle_requests_total``) are its own and its replica's
``/metrics`` shows only its replica; a report read from them would count one replica's traffic. So
the prediction log's writer thread copies this worker's running totals here when they moved, at most
once a second (one upsert of a few rows; nothing more on the request path), and a report reads the sum.
A worker that restarts has a new id and starts new rows; the old rows keep what it counted.
"""

from __future__ import annotations

import functools
import time
import sqlalchemy as sa

from common.metrics import VariantTotals
from experiments.store import METADATA, ExperimentStore

TRAFFIC = sa.Table(
    "variant_traffic", METADATA,
    sa.Column("model", sa.Text, primary_key=True),
    sa.Column("variant", sa.Text, primary_key=True),
    sa.Column("epoch", sa.Text, primary_key=True),  # the weights in force: experiments.router.epoch
    sa.Column("pinned", sa.Boolean, primary_key=True),  # the request chose the variant
    sa.Column("worker", sa.Text, primary_key=True),  # common.ids.worker_id(): replica/pid
    sa.Column("ok", sa.BigInteger, nullable=False),  # rows answered
    sa.Column("errors", sa.BigInteger, nullable=False),  # rows failed
    sa.Column("updated_at", sa.Double, nullable=False),
)


class TrafficStore:
    def __init__(self, store: ExperimentStore):
        self.store = store

    def publish(self, worker: str, totals: VariantTotals, now: float | None = None) -> None:
        """Replace ``worker``'s rows by its running ``totals`` (since the worker started)."""
        if not totals:
            return
        now = time.time() if now is None else now
        rows = [{"model": model, "variant": variant, "epoch": epoch, "pinned": pinned, "worker": worker,
                 "ok": int(ok), "errors": int(errors), "updated_at": now}
                for (model, variant, epoch, pinned), (ok, errors) in totals.items()]
        with self.store._write() as conn:
            conn.execute(self._upsert, rows)

    @functools.cached_property
    def _upsert(self) -> sa.Insert:
        """Built once: building it at every copy of the totals was a twelfth of the log writer's CPU."""
        insert = self.store._insert(TRAFFIC)
        return insert.on_conflict_do_update(
            index_elements=[c.name for c in TRAFFIC.primary_key],
            set_={"ok": insert.excluded.ok, "errors": insert.excluded.errors, "updated_at": insert.excluded.updated_at})

    def totals(self, model: str | None = None) -> VariantTotals:
        """Rows answered and failed per (model, variant, epoch, pinned) of ``model`` (default: every
        model), summed over workers."""
        t = TRAFFIC.c
        query = sa.select(t.model, t.variant, t.epoch, t.pinned, sa.func.sum(t.ok), sa.func.sum(t.errors))
        if model is not None:
            query = query.where(t.model == model)
        with self.store._read() as conn:
            rows = conn.execute(query.group_by(t.model, t.variant, t.epoch, t.pinned))
            return {(m, v, e, bool(p)): (float(ok), float(errors)) for m, v, e, p, ok, errors in rows}
