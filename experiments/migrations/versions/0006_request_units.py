"""The request of a prediction without a user: the unit the router randomized, counted by the
sample-ratio test and clustered by the decision's variance instead of each row alone.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("predictions", sa.Column("request_id", sa.String(64)))


def downgrade() -> None:
    op.drop_column("predictions", "request_id")
