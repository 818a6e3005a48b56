"""A real ``bentoml serve`` in a child process on a free port, for the tests and the benchmarks."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Callable

import httpx
import psutil

from common.config import GRPC_PORT_ENV

START_TIMEOUT_S = 180
PORT_RACE_RETRIES = 2
IDLE_SAMPLE_S = 0.5
"""Starts again after losing a port race: BentoML reserves a free port for its process manager's
control socket, releases it and binds it later, so a server starting beside another can find it taken
(``zmq.error.ZMQError: Address already in use``)."""
PORT_RACE = "Address already in use"


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports. Their sockets stay bound until all are chosen: asked one at a time,
    the kernel can hand out the same port twice (a server's HTTP and gRPC ports once collided so)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for bound in sockets:
            bound.bind(("127.0.0.1", 0))
        return [bound.getsockname()[1] for bound in sockets]


def free_port() -> int:
    return free_ports(1)[0]


def isolated_home(model_store: Path, folder: Path) -> Path:
    """A BENTOML_HOME of its own that links ``model_store``'s models and bentos.

    BentoML wipes ``$BENTOML_HOME/prometheus_multiproc_dir`` when a server starts, so two servers
    sharing a home break each other's metrics.
    """
    home = folder / "bentoml_home"
    home.mkdir(parents=True, exist_ok=True)
    for name in ("models", "bentos"):
        (model_store / name).mkdir(exist_ok=True)
        if not (home / name).exists():
            (home / name).symlink_to(model_store / name)
    return home


class ServerProcess:
    """``bentoml serve target``, or any ``command`` (given the port) that answers 200 on ``ready_path``,
    on ``port`` or a free one. ``wait=False`` returns at once: call :meth:`wait_ready` (servers started
    side by side load their models at the same time)."""

    def __init__(self, target: str, cwd: Path, env: dict[str, str], log_dir: Path,
                 timeout_s: float = START_TIMEOUT_S, command: Callable[[int], list[str]] | None = None,
                 ready_path: str = "/readyz", port: int | None = None, wait: bool = True):
        spare = [free for free in free_ports(2) if free != port]
        self.port = port or spare[0]
        self.url = f"http://127.0.0.1:{self.port}"
        # A gRPC port of its own too: servers sharing one by SO_REUSEPORT would answer each other's calls.
        self.grpc_port = int(env.get(GRPC_PORT_ENV) or next(free for free in spare if free != self.port))
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.ready_path = ready_path
        self.log = open(log_dir / f"server-{self.port}.log", "w+")
        argv = command(self.port) if command else [
            str(Path(sys.executable).with_name("bentoml")), "serve", target, "--host", "127.0.0.1",
            "--port", str(self.port)]
        # Copied after ``command`` ran: a command may put what it needs into ``env`` (a peer's port).
        self.env = env = {**env, GRPC_PORT_ENV: str(self.grpc_port)}
        self._launch = lambda: subprocess.Popen(argv, cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                                start_new_session=True)
        self.process = self._launch()
        if wait:
            self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        retries = PORT_RACE_RETRIES
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if retries and PORT_RACE in self.output():
                    retries -= 1
                    self.log.truncate(0)
                    self.log.seek(0)
                    self.process = self._launch()
                    continue
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}{self.ready_path}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        output = self.output()  # before stop() closes the log
        self.stop()
        raise RuntimeError(f"server not ready after {timeout_s}s:\n{output}")

    def processes(self) -> list[psutil.Process]:
        """The server and its workers."""
        parent = psutil.Process(self.process.pid)
        return [parent, *parent.children(recursive=True)]

    def workers(self) -> list[psutil.Process]:
        """The worker processes (the ones that answer), without BentoML's arbiter and helpers, and
        without the parent of forked workers (``serving/prefork.py``: it has the workers' command line
        and never answers); a worker that just died (a zombie until reaped) is left out."""
        found = []
        for process in self.processes():
            try:
                if "_bentoml_impl.worker" in " ".join(process.cmdline()):
                    found.append((process, process.ppid()))
            except psutil.NoSuchProcess:  # ZombieProcess included
                continue
        parents = {ppid for _, ppid in found}
        return [process for process, _ in found if process.pid not in parents]

    def wait_idle(self, idle_share: float = 0.2, limit_s: float = 20) -> None:
        """Until the server uses less than ``idle_share`` of a core (at most ``limit_s``): a benchmark run
        must not pay for the previous one's queues (a shadow variant keeps working through its copies
        after the load stops)."""
        deadline = time.monotonic() + limit_s
        processes = self.processes()
        while time.monotonic() < deadline:
            before = sum(sum(p.cpu_times()[:2]) for p in processes)
            time.sleep(IDLE_SAMPLE_S)
            if sum(sum(p.cpu_times()[:2]) for p in processes) - before < idle_share * IDLE_SAMPLE_S:
                return

    def memory(self) -> dict[str, int]:
        """RSS counts shared pages once per process; PSS shares them out, so it sums honestly."""
        rss = pss = 0
        for process in self.processes():
            with_shared = process.memory_full_info()
            rss += with_shared.rss
            pss += with_shared.pss
        return {"rss": rss, "pss": pss}

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
                self.process.wait(10)
        self.log.close()
