"""Alembic's environment: migrations run on the connection (and in the transaction) that
``ExperimentStore.migrate`` hands over, so no alembic.ini is needed and the lock it holds covers them.
``METADATA`` is the schema the store queries: ``alembic revision --autogenerate`` compares it with the
database to draft the next version."""

from alembic import context

from experiments.store import METADATA

context.configure(connection=context.config.attributes["connection"], target_metadata=METADATA,
                  render_as_batch=True)  # batch ALTERs: SQLite cannot alter most things in place
with context.begin_transaction():
    context.run_migrations()
