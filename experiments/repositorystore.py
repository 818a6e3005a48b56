"""The live model repository in the experiment store (migration 0004): which models every worker
should hold (``repository``), what each worker holds (``worker_models``), and the workers alive.

An API call writes the wish; each worker reconciles towards it in the background and reports its
own state per model, so ``GET`` shows the truth per worker, and every replica sharing the store
follows the same repository.
"""

from __future__ import annotations

import sqlalchemy as sa

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


class RepositoryStore:
    def __init__(self, store: ExperimentStore):
        self.store = store
