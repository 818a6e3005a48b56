"""Session fixtures: one temporary model store (trained and converted for real) and one server.

Set BUNDLE_TEST_STORE to an existing store folder to skip training and conversion while iterating
on tests; CI always builds a fresh one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from collections.abc import Iterator

import httpx
import pytest

from harness.server import ServerProcess as Server
from harness.server import isolated_home
from tests import ROOT
from harness.postgres import PostgresCluster


def run_module(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m module`` like a user would, with the test store."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env or os.environ.copy(),
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reuse = os.environ.get("BUNDLE_TEST_STORE")
    home = Path(reuse) if reuse else tmp_path_factory.mktemp("bentoml_home")
    os.environ["BENTOML_HOME"] = str(home)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ["PYTHONPATH"] = str(ROOT)
    if not reuse:
        for module in ("training", "conversion"):
            done = run_module(module)
            assert done.returncode == 0, f"python -m {module} failed:\n{done.stdout}\n{done.stderr}"
    return home


ADMIN_TOKEN = "test-admin-token"
FEEDBACK_TOKEN = "test-feedback-token"
TOKENS = {"BUNDLE_ADMIN_TOKEN": ADMIN_TOKEN, "BUNDLE_FEEDBACK_TOKEN": FEEDBACK_TOKEN}
"""The session server's bearer tokens, by the variable that sets each (``protocols/auth.py``)."""


def server_env(model_store: Path, config_copy: Path, **extra: str) -> dict[str, str]:
    """The environment of a test server: its own copy of config.yaml, which the admin endpoint may
    rewrite, and its own BENTOML_HOME linking the test store's models and bentos.
    """
    if not config_copy.exists():
        shutil.copy(ROOT / "config.yaml", config_copy)
    home = isolated_home(model_store, config_copy.parent)
    return {**os.environ, "BENTOML_HOME": str(home), "BUNDLE_CONFIG": str(config_copy), **extra}


@pytest.fixture(scope="session")
def server(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("server")
    env = server_env(model_store, folder / "config.yaml", **TOKENS)
    running = Server("service:Bundle", ROOT, env, folder)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def postgres_url(postgres: PostgresCluster) -> str:
    """The URL of the session server's ``bundle`` database (``postgresql://postgres@127.0.0.1:port/bundle``)."""
    return postgres.url
