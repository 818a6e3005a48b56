"""Fixtures of every test, unit and end-to-end."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.postgres import PostgresCluster


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A real PostgreSQL 15 server for the whole session (fails, never skips, if it is not installed)."""
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()
