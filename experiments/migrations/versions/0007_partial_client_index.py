"""The client id index holds only the predictions that carry one.

Most predictions have no client ``id``, yet each one added an entry (NULL) to ``ix_predictions_client_id``:
a B-tree insert per logged row for nothing. Feedback looks predictions up by ``client_id IN (...)``,
which implies ``client_id IS NOT NULL``, so SQLite and PostgreSQL both still use the partial index.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

CARRIES_ONE = sa.text("client_id IS NOT NULL")


def upgrade() -> None:
    op.drop_index("ix_predictions_client_id", "predictions")
    op.create_index("ix_predictions_client_id", "predictions", ["client_id"],
                    sqlite_where=CARRIES_ONE, postgresql_where=CARRIES_ONE)


def downgrade() -> None:
    op.drop_index("ix_predictions_client_id", "predictions")
    op.create_index("ix_predictions_client_id", "predictions", ["client_id"])
