"""Session fixtures: one temporary model store (trained and converted for real) and one server.

Set BUNDLE_TEST_STORE to an existing store folder to skip training and conversion while iterating
on tests; CI always builds a fresh one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVER_START_TIMEOUT_S = 180


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real ``bentoml serve`` process on a free port."""

    def __init__(self, target: str, cwd: Path, env: dict[str, str], log_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_dir / f"server-{self.port}.log", "w+")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name("bentoml")), "serve", target, "--host", "127.0.0.1",
             "--port", str(self.port)],
            cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not ready after {SERVER_START_TIMEOUT_S}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
        self.log.close()


ADMIN_TOKEN = "test-admin-token"


def server_env(model_store: Path, config_copy: Path, **extra: str) -> dict[str, str]:
    """The environment of a test server: its own copy of config.yaml, which the admin endpoint may
    rewrite, and its own BENTOML_HOME linking the test store's models and bentos. BentoML wipes
    ``$BENTOML_HOME/prometheus_multiproc_dir`` when a server starts, so two servers must not share one.
    """
    if not config_copy.exists():
        shutil.copy(ROOT / "config.yaml", config_copy)
    home = config_copy.parent / "bentoml_home"
    home.mkdir(exist_ok=True)
    for folder in ("models", "bentos"):
        (model_store / folder).mkdir(exist_ok=True)
        if not (home / folder).exists():
            (home / folder).symlink_to(model_store / folder)
    return {**os.environ, "BENTOML_HOME": str(home), "BUNDLE_CONFIG": str(config_copy), **extra}


@pytest.fixture(scope="session")
def server(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("server")
    env = server_env(model_store, folder / "config.yaml", BUNDLE_ADMIN_TOKEN=ADMIN_TOKEN)
    running = Server("service:Bundle", ROOT, env, folder)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
