"""The throwaway PostgreSQL of the tests lives in ``harness/postgres.py`` (the local fleet starts one
too); this name stays for test modules that import it from here."""

from harness.postgres import PostgresCluster

__all__ = ["PostgresCluster"]
