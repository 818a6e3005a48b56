"""The experiments' history: every change of weights and every recorded decision.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "weight_changes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Double, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("old_weights", sa.JSON, nullable=False),
        sa.Column("new_weights", sa.JSON, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
    )
    op.create_index("ix_weight_changes_model_at", "weight_changes", ["model", "at"])
    op.create_table(
        "decisions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Double, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("candidate", sa.Text, nullable=False),
        sa.Column("verdict", sa.Text, nullable=False),
        sa.Column("detail", sa.JSON, nullable=False),
    )
    op.create_index("ix_decisions_model_at", "decisions", ["model", "at"])


def downgrade() -> None:
    op.drop_table("decisions")
    op.drop_table("weight_changes")
