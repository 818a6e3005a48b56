"""Peer model servers beside this project in one benchmark run: how to install, start and load each.

Each peer lives in a virtual environment of its own (``.venv-peers/<name>``, from
``bench/peers/requirements-<name>.txt``; made once, again when the requirements change) and serves
the same stored scikit-learn model as ``/predict`` wine (``wine_sklearn:v1``), configured as the
performance issue compares them: 2 workers or equivalent, batching 64 rows / 10 ms where the server
has it. Each is loaded with its own protocol's request for one row of 13 floats.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

from common import datasets, store
from common.logs import get_logger
from harness.server import ServerProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / ".venv-peers"
MODEL_TAG = "wine_sklearn:v1"
START_ATTEMPTS = 3
"""A peer that fails to start is started again: PyTriton's model stubs once found its handshake socket
not listening yet (connection refused) in a bench run, and started at the next try."""
log = get_logger("bench")


@dataclass(frozen=True)
class Peer:
    name: str
    path: str
    """The inference route, loaded by the benchmark."""
    ready_path: str
    body: Callable[[list[float]], dict]
    command: Callable[[Path, Path, int], list[str]]
    """The server's command line, from its venv's python, a work folder and the port."""
    env: dict[str, str] = field(default_factory=dict)
    """Set for the server beside ``PEER_PORT`` and ``PEER_MODEL_FILE``."""


def _mlserver(python: Path, folder: Path, port: int) -> list[str]:
    code = ("import sys; from pathlib import Path; from bench.peers.mlserver_wine import settings; "
            "settings(Path(sys.argv[1]), *map(int, sys.argv[2:]))")
    subprocess.run([str(python), "-c", code, str(folder), str(port), str(free_port()), str(free_port())],
                   cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    return [str(python.with_name("mlserver")), "start", str(folder)]


def _module(name: str, arguments: Callable[[], list[str]] = list) -> Callable[[Path, Path, int], list[str]]:
    """The command running ``bench/peers/<name>.py`` with the peer's python (the port is ``PEER_PORT``)."""
    return lambda python, folder, port: [str(python), "-m", f"bench.peers.{name}", *arguments()]


def _inputs_body(row: list[float]) -> dict:
    return {"inputs": row}


def _oip_body(row: list[float]) -> dict:
    return {"inputs": [{"name": "input", "shape": [1, len(row)], "datatype": "FP32", "data": row}]}


PEERS = {peer.name: peer for peer in (
    Peer("mosec", "/inference", "/", _inputs_body, _module("mosec_wine")),
    Peer("kserve", "/v1/models/wine:predict", "/v1/models/wine", lambda row: {"instances": [row]},
         _module("kserve_wine")),
    Peer("mlserver", "/v2/models/wine/infer", "/v2/models/wine/ready", _oip_body, _mlserver),
    Peer("litserve", "/predict", "/health", _inputs_body, _module("litserve_wine")),
    Peer("pytriton", "/v2/models/wine/infer", "/v2/models/wine/ready", _oip_body,
         _module("pytriton_wine", lambda: [str(free_port()), str(free_port())]),  # its gRPC and metrics ports
         # Triton's Python stub links libpython3.11.so.1.0: the venv's own, not the system's older one
         # (whose C modules fail under the venv's standard library: RLock has no _recursion_count).
         env={"LD_LIBRARY_PATH": str(Path(sys.base_exec_prefix) / "lib")}),
    Peer("ray", "/", "/", _inputs_body, _module("ray_wine")),
)}


def requirements(name: str) -> Path:
    return ROOT / "bench" / "peers" / f"requirements-{name}.txt"


def ensure_venv(name: str) -> Path:
    """The peer's python, installing its venv first if it is missing or its requirements changed."""
    venv = VENVS / name
    python = venv / "bin" / "python"
    wanted = hashlib.sha256(requirements(name).read_bytes()).hexdigest()
    stamp = venv / ".requirements-sha256"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    base_python = Path(sys.base_exec_prefix) / "bin" / "python3"  # not this venv's: a venv of its own
    subprocess.run([str(base_python), "-m", "venv", "--clear", str(venv)], check=True)
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-r", str(requirements(name))],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pip could not install {requirements(name)}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    stamp.write_text(wanted)
    return python


def body(name: str) -> bytes:
    """One row of the test split in the peer's request format."""
    return json.dumps(PEERS[name].body(datasets.load("wine").x_test[0].tolist())).encode()


def start(name: str, folder: Path) -> ServerProcess:
    """The peer serving the stored wine model, on a free port, ready."""
    peer = PEERS[name]
    python = ensure_venv(name)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PEER_MODEL_FILE": str(store.model_file(store.get(MODEL_TAG))),
           **peer.env}

    def command(port: int) -> list[str]:
        env["PEER_PORT"] = str(port)  # read before the process starts with this env
        return peer.command(python, folder, port)

    for attempt in range(1, START_ATTEMPTS):
        try:
            return ServerProcess(name, folder, env, folder, command=command, ready_path=peer.ready_path)
        except RuntimeError as err:
            log.warning("peer did not start; starting it again", extra={"peer": name, "attempt": attempt,
                                                                        "reason": str(err)[-300:]})
    return ServerProcess(name, folder, env, folder, command=command, ready_path=peer.ready_path)
