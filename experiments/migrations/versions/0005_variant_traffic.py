"""Rows answered and failed per variant and worker, summed by the report and the decision over every
replica (``experiments/trafficstore.py``).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "variant_traffic",
        sa.Column("model", sa.Text, primary_key=True),
        sa.Column("variant", sa.Text, primary_key=True),
        sa.Column("epoch", sa.Text, primary_key=True),
        sa.Column("pinned", sa.Boolean, primary_key=True),
        sa.Column("worker", sa.Text, primary_key=True),
        sa.Column("ok", sa.BigInteger, nullable=False),
        sa.Column("errors", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("variant_traffic")
