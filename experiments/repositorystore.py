"""The live model repository in the experiment store (migration 0004): which models every worker
should hold (``repository``), what each worker holds (``worker_models``), and the workers alive.

An API call writes the wish; each worker reconciles towards it in the background and reports its
own state per model, so ``GET`` shows the truth per worker, and every replica sharing the store
follows the same repository.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from common.errors import RequestError
from experiments.store import METADATA, ExperimentStore

REPOSITORY = sa.Table(
    "repository", METADATA,
    sa.Column("tag", sa.Text, primary_key=True),
    sa.Column("desired", sa.Text, nullable=False),  # loaded | unloaded
    sa.Column("version", sa.Integer, nullable=False),  # raised by every request, so a reload is seen
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
)
WORKER_MODELS = sa.Table(
    "worker_models", METADATA,
    sa.Column("worker", sa.Text, primary_key=True),
    sa.Column("tag", sa.Text, primary_key=True),
    sa.Column("state", sa.Text, nullable=False),  # loading | ready | failed | unloading | unloaded
    sa.Column("reason", sa.Text),
    sa.Column("rss_bytes", sa.BigInteger),
    sa.Column("updated_at", sa.Double, nullable=False),
)
WORKERS = sa.Table(
    "workers", METADATA,
    sa.Column("worker", sa.Text, primary_key=True),  # replica/pid
    sa.Column("replica", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Double, nullable=False),
    sa.Column("seen_at", sa.Double, nullable=False),
)
DESIRED = frozenset({"loaded", "unloaded"})


class RepositoryStore:
    def __init__(self, store: ExperimentStore):
        self.store = store

    # -- the wishes -----------------------------------------------------------------------------------

    def request(self, tag: str, desired: str, reason: str) -> int:
        """Wish ``tag`` ``desired`` ("loaded" | "unloaded") in every worker: the new version (raised on
        every request, so asking again to load a model reloads it)."""
        if desired not in DESIRED:
            raise RequestError("desired", f"{desired!r} is not a state a model can be wished in",
                               expected=" or ".join(sorted(DESIRED)))
        now = time.time()
        insert = self.store._insert(REPOSITORY).values(tag=tag, desired=desired, version=1, reason=reason,
                                                        updated_at=now)
        upsert = insert.on_conflict_do_update(
            index_elements=[REPOSITORY.c.tag],
            set_={"desired": desired, "version": REPOSITORY.c.version + 1, "reason": reason, "updated_at": now})
        with self.store._write() as conn:
            return int(conn.execute(upsert.returning(REPOSITORY.c.version)).scalar_one())

    def wishes(self) -> dict[str, tuple[str, int]]:
        """Every tag wished: (desired, version)."""
        r = REPOSITORY.c
        with self.store._read() as conn:
            return {tag: (desired, int(version))
                    for tag, desired, version in conn.execute(sa.select(r.tag, r.desired, r.version))}

    # -- what each worker holds -----------------------------------------------------------------------

    def report(self, worker: str, tag: str, state: str, reason: str | None = None,
               rss_bytes: int | None = None) -> None:
        """``worker``'s state of ``tag`` now (loading | ready | failed | unloading | unloaded)."""
        values = {"state": state, "reason": reason, "rss_bytes": rss_bytes, "updated_at": time.time()}
        upsert = (self.store._insert(WORKER_MODELS).values(worker=worker, tag=tag, **values)
                  .on_conflict_do_update(index_elements=[WORKER_MODELS.c.worker, WORKER_MODELS.c.tag], set_=values))
        with self.store._write() as conn:
            conn.execute(upsert)

    def heartbeat(self, worker: str, replica: str, pid: int, started_at: float) -> None:
        """``worker`` is alive now."""
        now = time.time()
        upsert = (self.store._insert(WORKERS).values(worker=worker, replica=replica, pid=pid,
                                                      started_at=started_at, seen_at=now)
                  .on_conflict_do_update(index_elements=[WORKERS.c.worker],
                                         set_={"replica": replica, "pid": pid, "started_at": started_at,
                                               "seen_at": now}))
        with self.store._write() as conn:
            conn.execute(upsert)

    def states(self, alive_within_s: float, now: float | None = None) -> dict[str, dict[str, dict[str, Any]]]:
        """Per worker seen within ``alive_within_s``, per tag: state, reason, rss_bytes, updated_at."""
        now = time.time() if now is None else now
        w, m = WORKERS.c, WORKER_MODELS.c
        with self.store._read() as conn:
            alive = conn.execute(sa.select(w.worker).where(w.seen_at >= now - alive_within_s)).scalars().all()
            rows = conn.execute(sa.select(m.worker, m.tag, m.state, m.reason, m.rss_bytes, m.updated_at)
                                .where(m.worker.in_(alive)).order_by(m.worker, m.tag)).all() if alive else []
        states: dict[str, dict[str, dict[str, Any]]] = {worker: {} for worker in alive}
        for row in rows:
            states[row.worker][row.tag] = {"state": row.state, "reason": row.reason, "rss_bytes": row.rss_bytes,
                                           "updated_at": row.updated_at}
        return states

    def forget(self, worker: str) -> None:
        """A worker gone (shut down): its row and its models' states."""
        with self.store._write() as conn:
            conn.execute(sa.delete(WORKER_MODELS).where(WORKER_MODELS.c.worker == worker))
            conn.execute(sa.delete(WORKERS).where(WORKERS.c.worker == worker))
