"""The prediction log: live predictions, shadow answers under the same id, and their feedback.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ID_LENGTH = 64


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("prediction_id", sa.String(ID_LENGTH), primary_key=True),
        sa.Column("client_id", sa.Text),
        sa.Column("served_at", sa.Double, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("variant", sa.Text, nullable=False),
        sa.Column("model_tag", sa.Text, nullable=False),
        sa.Column("pinned", sa.Boolean, nullable=False),
        sa.Column("epoch", sa.Text, nullable=False),
        sa.Column("user_key", sa.Text),
        sa.Column("api_key", sa.Text),
        sa.Column("endpoint", sa.Text, nullable=False),
        sa.Column("label", sa.Text, nullable=False),
        sa.Column("label_index", sa.Integer, nullable=False),
        sa.Column("top_probability", sa.Double, nullable=False),
        sa.Column("probabilities", sa.JSON, nullable=False),
        sa.Column("latency_ms", sa.Double, nullable=False),
    )
    op.create_index("ix_predictions_client_id", "predictions", ["client_id"])
    op.create_index("ix_predictions_served_at", "predictions", ["served_at"])
    op.create_index("ix_predictions_model_served_at", "predictions", ["model", "served_at"])
    op.create_table(
        "shadow_predictions",
        sa.Column("prediction_id", sa.String(ID_LENGTH), primary_key=True),
        sa.Column("served_at", sa.Double, nullable=False),
        sa.Column("variant", sa.Text, nullable=False),
        sa.Column("model_tag", sa.Text, nullable=False),
        sa.Column("label", sa.Text, nullable=False),
        sa.Column("label_index", sa.Integer, nullable=False),
        sa.Column("probabilities", sa.JSON, nullable=False),
    )
    op.create_index("ix_shadow_predictions_served_at", "shadow_predictions", ["served_at"])
    op.create_table(
        "feedback",
        sa.Column("prediction_id", sa.String(ID_LENGTH), primary_key=True),
        sa.Column("label", sa.Text),
        sa.Column("label_index", sa.Integer),
        sa.Column("reward", sa.Double),
        sa.Column("log_loss", sa.Double),
        sa.Column("brier", sa.Double),
        sa.Column("received_at", sa.Double, nullable=False),
        sa.Column("corrections", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    for table in ("feedback", "shadow_predictions", "predictions"):
        op.drop_table(table)
