"""Two suites: ``tests/unit`` (in process, seconds, no trained store) and ``tests/e2e`` (a trained
store and real ``bentoml serve`` processes). ``make test`` runs both, ``make test-unit`` the first."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
