"""A local fleet, started the way operators start one: a PostgreSQL for the shared experiment store,
replicas of ``bentoml serve service:Bundle`` (each its own port, BENTOML_HOME, config.yaml copy and
``BUNDLE_REPLICA_ID``), HAProxy in front (``deploy/haproxy/haproxy.cfg``) and Prometheus scraping every
replica (``deploy/prometheus``), on free or given ports.

    python -m harness.fleet up [--replicas 3] [--port 8080] [--prometheus-port 9090]
    python -m harness.fleet down

``up`` prints the URLs and tokens and returns, leaving the fleet running; its folder (``.fleet/`` by
default) holds every log, the rendered configurations and ``state.json`` (pids and ports), from which
``down`` stops it all. The tests use :func:`up` and :meth:`Fleet.down` the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from string import Template

import httpx
import psutil

from common.ids import REPLICA_ENV
from harness.postgres import PostgresCluster
from harness.server import START_TIMEOUT_S, ServerProcess, free_port, isolated_home

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DEFAULT_FOLDER = ROOT / ".fleet"
STATE = "state.json"
REPLICAS = 3
TOKENS = ("BUNDLE_ADMIN_TOKEN", "BUNDLE_FEEDBACK_TOKEN")
STOP_TIMEOUT_S = 30.0  # a replica finishes its requests in flight, then exits; after this it is killed
PART_START_TIMEOUT_S = 30.0  # HAProxy and Prometheus start in a second or two


@dataclass
class Fleet:
    """A running fleet: ``url`` is the load balancer's, ``replicas`` each replica's server."""

    folder: Path
    url: str
    stats_url: str
    prometheus_url: str
    replicas: list[ServerProcess]
    postgres: PostgresCluster
    haproxy: subprocess.Popen
    prometheus: subprocess.Popen
    tokens: dict[str, str]

    def replica_id(self, index: int) -> str:
        return self.replicas[index].env[REPLICA_ENV]

    def backend_status(self) -> dict[str, str]:
        """HAProxy's view of each replica (``UP``, ``DOWN``, ``UP 1/2`` while a check fails...)."""
        rows = httpx.get(f"{self.stats_url};csv", timeout=5).text.lstrip("# ").splitlines()
        header = rows[0].split(",")
        entries = [dict(zip(header, row.split(","))) for row in rows[1:]]
        return {e["svname"]: e["status"] for e in entries
                if e["pxname"] == "replicas" and e["svname"] not in ("FRONTEND", "BACKEND")}

    def kill(self, index: int) -> None:
        """SIGKILL replica ``index``'s server and workers at once, as when its machine dies (the workers
        run in process groups of their own: killing the server alone would leave them serving); returns
        once they are gone (a dying process keeps its sockets until its memory is released)."""
        processes = self.replicas[index].processes()
        for process in processes:
            process.kill()
        psutil.wait_procs(processes, timeout=STOP_TIMEOUT_S)

    def restart(self, index: int, timeout_s: float = START_TIMEOUT_S) -> ServerProcess:
        """Start replica ``index`` again as it was (its port, home, configuration and id), after
        :meth:`kill`, as an orchestrator restarts a dead pod; returns once it is ready."""
        old = self.replicas[index]
        old.log.close()
        server = ServerProcess("service:Bundle", ROOT, old.env, Path(old.log.name).parent, port=old.port, wait=False)
        self.replicas[index] = server
        state = json.loads((self.folder / STATE).read_text())
        state["replicas"][index]["pid"] = server.process.pid
        (self.folder / STATE).write_text(json.dumps(state, indent=2))
        server.wait_ready(timeout_s)
        return server

    def down(self) -> None:
        down(self.folder)


def up(model_store: Path, folder: Path = DEFAULT_FOLDER, replicas: int = REPLICAS, port: int = 0,
       stats_port: int = 0, prometheus_port: int = 0, replica_ports: list[int] | None = None,
       config: Path = ROOT / "config.yaml", env: dict[str, str] | None = None,
       timeout_s: float = START_TIMEOUT_S * 2) -> Fleet:
    """Start a fleet whose replicas serve ``model_store``'s models with ``config``; 0 ports are free ones.
    ``env`` adds to every replica's environment (the admin and feedback tokens are drawn when absent);
    each replica's ``BUNDLE_REPLICA_ID`` is ``host:port``."""
    if (folder / STATE).exists():
        raise RuntimeError(f"a fleet is already up in {folder}: python -m harness.fleet down --folder {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(env or {})
    tokens = {name: env.get(name) or secrets.token_hex(16) for name in TOKENS}
    state: dict = {"folder": str(folder)}

    def save() -> None:
        (folder / STATE).write_text(json.dumps(state, indent=2))

    postgres = PostgresCluster()
    state["postgres"] = {"root": str(postgres.root), "port": postgres.port}
    save()
    try:
        postgres.start()
        ports = replica_ports or [free_port() for _ in range(replicas)]
        servers = [_replica(model_store, folder / f"replica-{i + 1}", replica_port, config,
                            {**env, **tokens, "BUNDLE_STORE_URL": postgres.url})
                   for i, replica_port in enumerate(ports)]
        state["replicas"] = [{"id": s.env[REPLICA_ENV], "url": s.url, "pid": s.process.pid} for s in servers]
        save()
        with ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(lambda s: s.wait_ready(timeout_s), servers))
        lb_port, stats = port or free_port(), stats_port or free_port()
        haproxy = _haproxy(folder, lb_port, stats, servers)
        state["haproxy"] = {"pid": haproxy.pid, "url": f"http://127.0.0.1:{lb_port}", "stats_url":
                            f"http://127.0.0.1:{stats}/stats"}
        save()
        prometheus_at = prometheus_port or free_port()
        prometheus = _prometheus(folder / "prometheus", prometheus_at, servers, stats)
        state["prometheus"] = {"pid": prometheus.pid, "url": f"http://127.0.0.1:{prometheus_at}"}
        save()
        fleet = Fleet(folder, state["haproxy"]["url"], state["haproxy"]["stats_url"], state["prometheus"]["url"],
                      servers, postgres, haproxy, prometheus, tokens)
        _wait(lambda: set(fleet.backend_status().values()) == {"UP"}, "HAProxy to see every replica UP")
    except BaseException:
        down(folder)
        raise
    return fleet


def down(folder: Path = DEFAULT_FOLDER) -> None:
    """Stop what ``state.json`` in ``folder`` names (the load balancer first, the database last), then
    forget it. Parts already gone are skipped."""
    path = folder / STATE
    if not path.exists():
        return
    state = json.loads(path.read_text())
    pids = [state[part]["pid"] for part in ("haproxy", "prometheus") if part in state]
    pids += [replica["pid"] for replica in state.get("replicas", [])]
    with ThreadPoolExecutor(max(len(pids), 1)) as pool:
        list(pool.map(_terminate, pids))
    if "postgres" in state:
        PostgresCluster(Path(state["postgres"]["root"]), state["postgres"]["port"]).remove()
    path.unlink()


def _replica(model_store: Path, folder: Path, port: int, config: Path, env: dict[str, str]) -> ServerProcess:
    """One replica, as on a machine of its own: its own home, its own copy of config.yaml."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(config, folder / "config.yaml")
    replica_env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", **env,
                   "BENTOML_HOME": str(isolated_home(model_store, folder)), "BUNDLE_CONFIG": str(folder / "config.yaml"),
                   REPLICA_ENV: f"{socket.gethostname()}:{port}"}
    return ServerProcess("service:Bundle", ROOT, replica_env, folder, port=port, wait=False)


def _haproxy(folder: Path, port: int, stats_port: int, servers: list[ServerProcess]) -> subprocess.Popen:
    lines = "\n".join(f"    server replica{i + 1} 127.0.0.1:{s.port} check" for i, s in enumerate(servers))
    text = Template((DEPLOY / "haproxy" / "haproxy.cfg").read_text()).substitute(
        bind=f"127.0.0.1:{port}", stats_bind=f"127.0.0.1:{stats_port}", servers=lines)
    (folder / "haproxy.cfg").write_text(text)
    program = _program("haproxy")
    checked = subprocess.run([program, "-c", "-f", str(folder / "haproxy.cfg")], check=False, capture_output=True,
                             text=True)
    if checked.returncode != 0:
        raise RuntimeError(f"haproxy refused {folder / 'haproxy.cfg'}:\n{checked.stdout}{checked.stderr}")
    process = _start([program, "-db", "-f", str(folder / "haproxy.cfg")], folder / "haproxy.log")
    _wait(lambda: httpx.get(f"http://127.0.0.1:{stats_port}/stats", timeout=2).status_code == 200,
          "HAProxy's stats page", process)
    return process


def _prometheus(folder: Path, port: int, servers: list[ServerProcess], haproxy_stats_port: int) -> subprocess.Popen:
    """The shipped prometheus.yml and rules, the replicas as its file_sd targets."""
    (folder / "targets").mkdir(parents=True, exist_ok=True)
    for name in ("prometheus.yml", "alerts.yml"):
        shutil.copy(DEPLOY / "prometheus" / name, folder / name)
    targets = [{"targets": [f"127.0.0.1:{s.port}"], "labels": {"replica": s.env[REPLICA_ENV]}} for s in servers]
    (folder / "targets" / "replicas.json").write_text(json.dumps(targets))
    (folder / "targets" / "haproxy.json").write_text(json.dumps([{"targets": [f"127.0.0.1:{haproxy_stats_port}"]}]))
    process = _start([_program("prometheus"), f"--config.file={folder / 'prometheus.yml'}",
                      f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                     folder / "prometheus.log")
    def scraping() -> bool:
        # A starting Prometheus answers 503 "Service Unavailable" (not JSON) until its storage is open:
        # raised, that is "not yet" to _wait, like a refused connection.
        answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/targets", timeout=2).raise_for_status()
        active = answer.json()["data"]["activeTargets"]
        return sum(t["labels"]["job"] == "bundle" and t["health"] == "up" for t in active) == len(servers)

    _wait(scraping, "Prometheus to scrape every replica", process)
    return process


def _program(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise RuntimeError(f"{name} is not installed: `make tools` installs Debian's {name} package")
    return found


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(ready: Callable[[], bool], what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + PART_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} while waiting for {what}")
        try:
            if ready():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


def _terminate(pid: int) -> None:
    """SIGTERM to the process group ``pid`` leads (each part runs in a session of its own), then SIGKILL
    to it and its children (a replica's workers have groups of their own) still there after
    ``STOP_TIMEOUT_S``."""
    try:
        process = psutil.Process(pid)
        family = [process, *process.children(recursive=True)]
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, psutil.NoSuchProcess):
        return
    _, alive = psutil.wait_procs(family, timeout=STOP_TIMEOUT_S)
    for left in alive:
        left.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.fleet", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER, help="logs, configurations and state.json")
    parser.add_argument("--replicas", type=int, default=REPLICAS)
    parser.add_argument("--port", type=int, default=0, help="the load balancer's (default: a free port)")
    parser.add_argument("--stats-port", type=int, default=0, help="HAProxy's stats page and exporter")
    parser.add_argument("--prometheus-port", type=int, default=0)
    parser.add_argument("--replica-ports", type=lambda text: [int(p) for p in text.split(",")], default=None,
                        help="comma-separated, one per replica")
    parser.add_argument("--config", type=Path, default=ROOT / "config.yaml", help="each replica gets a copy")
    parser.add_argument("--model-store", type=Path, default=Path(os.environ.get("BENTOML_HOME", ROOT / ".bentoml")))
    args = parser.parse_args(argv)
    if args.command == "down":
        down(args.folder)
        print(f"fleet in {args.folder} stopped")
        return 0
    if args.replica_ports and len(args.replica_ports) != args.replicas:
        parser.error(f"--replica-ports names {len(args.replica_ports)} ports for {args.replicas} replicas")
    fleet = up(args.model_store, args.folder, args.replicas, args.port, args.stats_port, args.prometheus_port,
               args.replica_ports, args.config, {k: os.environ[k] for k in TOKENS if k in os.environ})
    print(f"load balancer  {fleet.url}\nHAProxy stats  {fleet.stats_url}\nPrometheus     {fleet.prometheus_url}")
    for server in fleet.replicas:
        print(f"replica        {server.url}  ({server.env[REPLICA_ENV]})")
    print(f"PostgreSQL     {fleet.postgres.url}")
    for name, token in fleet.tokens.items():
        print(f"export {name}={token}")
    print(f"logs in {args.folder}; stop with: python -m harness.fleet down --folder {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
