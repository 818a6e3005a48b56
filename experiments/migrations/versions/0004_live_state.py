"""Live state: the experiments in force, the model repository each worker follows, and rollouts.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "experiment_state",
        sa.Column("model", sa.Text, primary_key=True),
        sa.Column("document", sa.JSON, nullable=False),
        sa.Column("declared", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
    )
    op.create_table(
        "repository",
        sa.Column("tag", sa.Text, primary_key=True),
        sa.Column("desired", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
    )
    op.create_table(
        "worker_models",
        sa.Column("worker", sa.Text, primary_key=True),
        sa.Column("tag", sa.Text, primary_key=True),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("rss_bytes", sa.BigInteger),
        sa.Column("updated_at", sa.Double, nullable=False),
    )
    op.create_table(
        "workers",
        sa.Column("worker", sa.Text, primary_key=True),
        sa.Column("replica", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", sa.Double, nullable=False),
        sa.Column("seen_at", sa.Double, nullable=False),
    )
    op.create_table(
        "rollouts",
        sa.Column("model", sa.Text, primary_key=True),
        sa.Column("candidate", sa.Text, nullable=False),
        sa.Column("control", sa.Text, nullable=False),
        sa.Column("policy", sa.JSON, nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("step_started_at", sa.Double, nullable=False),
        sa.Column("step_labels_start", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("started_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
    )


def downgrade() -> None:
    for table in ("rollouts", "workers", "worker_models", "repository", "experiment_state"):
        op.drop_table(table)
