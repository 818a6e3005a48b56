"""A throwaway PostgreSQL cluster for the tests and the local fleet (``harness/fleet.py``): ``initdb``
and ``pg_ctl`` in a temporary directory, on a free port, trust authentication on 127.0.0.1 and a unix
socket in that directory.

PostgreSQL refuses to run as root, so as root the cluster belongs to the unprivileged ``postgres``
user (the Debian package creates it) and every server command runs through ``runuser``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

from harness.server import free_port

VERSION = "15"
DEBIAN_BIN = Path("/usr/lib/postgresql")
SERVER_USER = "postgres"
SUPERUSER = "postgres"
COMMAND_TIMEOUT_S = 120  # initdb, start and stop each take seconds; this only stops a hung one


def server_binaries() -> Path:
    """The folder of ``initdb`` and ``pg_ctl``: PostgreSQL 15's Debian folder, else whatever is on PATH
    or installed beside it; a clear error if there is none."""
    candidates = [DEBIAN_BIN / VERSION / "bin"]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    candidates += sorted(DEBIAN_BIN.glob("*/bin"), reverse=True)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise RuntimeError(f"PostgreSQL server binaries (initdb, pg_ctl) not found in {DEBIAN_BIN}/*/bin or on PATH: "
                       f"install PostgreSQL {VERSION} (Debian: apt-get install postgresql; `make tools` does)")


class PostgresCluster:
    """A cluster created (not started) in a new temporary directory on a free port, or on ``port``; with
    ``root``, the cluster an earlier one created there (to stop it from another process). ``url`` is its
    ``bundle`` database."""

    def __init__(self, root: Path | None = None, port: int | None = None) -> None:
        self.bin = server_binaries()
        self.root = root or Path(tempfile.mkdtemp(prefix="bundle-pg-"))
        self.data = self.root / "data"
        self.port = port or free_port()
        self._as_server = ["runuser", "-u", SERVER_USER, "--"] if os.geteuid() == 0 else []
        self._created = (self.data / "PG_VERSION").exists()
        if not self._created:
            if self._as_server:
                shutil.chown(self.root, SERVER_USER, SERVER_USER)
            self._run("initdb", "-D", str(self.data), "--auth=trust", f"--username={SUPERUSER}", "--encoding=UTF8",
                      "--no-locale", "--no-sync")
        self.url = self.database_url("bundle")

    def database_url(self, name: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{name}"

    def start(self) -> None:
        """Start the server and wait until it accepts connections (creating ``bundle`` the first time)."""
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
                   "-c fsync=off")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options, "-w", "start")
        if not self._created:
            self.create_database("bundle")
            self._created = True

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def create_database(self, name: str) -> str:
        """A new empty database on the running server: its URL."""
        with psycopg.connect(self.database_url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.database_url(name)

    def remove(self) -> None:
        """Stop the server if it runs, and delete the cluster."""
        if (self.data / "postmaster.pid").exists():
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, program: str, *args: str) -> None:
        done = subprocess.run([*self._as_server, str(self.bin / program), *args], check=False, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)
        if done.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{program} {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n{tail}")
