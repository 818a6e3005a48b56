"""The experiments in force, in the experiment store (migration 0004): the source of truth while serving.

config.yaml declares the experiments a deployment starts with; every live change (an admin's weights,
a promote, a rollback, a rollout step, a variant added or removed) is written here, with its version,
and every worker (and every replica sharing the store) follows it.
"""

from __future__ import annotations

import sqlalchemy as sa

from experiments.store import METADATA, ExperimentStore

EXPERIMENT_STATE = sa.Table(
    "experiment_state", METADATA,
    sa.Column("model", sa.Text, primary_key=True),
    sa.Column("document", sa.JSON, nullable=False),  # common.config.Experiment, model_dump(mode="json")
    sa.Column("declared", sa.Text, nullable=False),  # SHA-256 of the config.yaml declaration last applied
    sa.Column("version", sa.Integer, nullable=False),  # raised by every change
    sa.Column("source", sa.Text, nullable=False),  # config | admin | promote | rollback | rollout
    sa.Column("updated_at", sa.Double, nullable=False),
)


class StateStore:
    def __init__(self, store: ExperimentStore):
        self.store = store
