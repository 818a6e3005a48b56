"""Progressive rollouts in the experiment store (migration 0004): one row per experiment, the step it
is at and since when, so that whichever worker holds the controller lease continues from it."""

from __future__ import annotations

import sqlalchemy as sa

from experiments.store import METADATA, ExperimentStore

ROLLOUTS = sa.Table(
    "rollouts", METADATA,
    sa.Column("model", sa.Text, primary_key=True),
    sa.Column("candidate", sa.Text, nullable=False),
    sa.Column("control", sa.Text, nullable=False),
    sa.Column("policy", sa.JSON, nullable=False),  # common.config.Rollout, model_dump(mode="json")
    sa.Column("step", sa.Integer, nullable=False),  # index into policy.steps
    sa.Column("state", sa.Text, nullable=False),  # running | paused | promoted | rolled_back | aborted
    sa.Column("step_started_at", sa.Double, nullable=False),
    sa.Column("step_labels_start", sa.Integer, nullable=False),  # labelled rows of the candidate then
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("started_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
)


class RolloutStore:
    def __init__(self, store: ExperimentStore):
        self.store = store
