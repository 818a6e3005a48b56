"""Monitoring: sampled live inputs, drift checks with their per-feature series, and leases.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "input_samples",
        sa.Column("prediction_id", sa.String(64), primary_key=True),
        sa.Column("served_at", sa.Double, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("variant", sa.Text, nullable=False),
        sa.Column("model_tag", sa.Text, nullable=False),
        sa.Column("inputs", sa.JSON, nullable=False),
    )
    op.create_index("ix_input_samples_model_served_at", "input_samples", ["model", "served_at"])
    op.create_table(
        "drift_checks",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Double, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("detail", sa.JSON, nullable=False),
    )
    op.create_index("ix_drift_checks_model_at", "drift_checks", ["model", "at"])
    op.create_table(
        "drift_features",
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
    )
    op.create_index("ix_drift_features_model_at", "drift_features", ["model", "at"])
    op.create_table(
        "leases",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("holder", sa.Text, nullable=False),
        sa.Column("expires_at", sa.Double, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("leases")
    op.drop_table("drift_features")
    op.drop_table("drift_checks")
    op.drop_table("input_samples")
