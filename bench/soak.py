"""Soak: hold a fixed request rate for minutes and check that memory stays flat and nothing is lost.

``python -m bench.soak`` starts a server, measures its capacity for single-row /predict (closed
loop, 32 connections), then sends 80% of it on a fixed schedule for 5 minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench import loadgen, scenarios
from bundle.server_process import ServerProcess, isolated_home

ROOT = Path(__file__).resolve().parent.parent
MAX_RSS_GROWTH = 0.10


@dataclass
class SoakResult:
    sent: int
    answered: int
    statuses: dict[str, int]
    p99_ms: float
    rss_before: int
    rss_after: int

    @property
    def rss_growth(self) -> float:
        return self.rss_after / self.rss_before - 1

    def ok(self) -> bool:
        return (self.sent == self.answered and set(self.statuses) <= {"200"}
                and self.rss_growth < MAX_RSS_GROWTH)


def soak(server: ServerProcess, rate: float, seconds: float) -> SoakResult:
    body = scenarios.bodies()["predict-wine"]
    loadgen.open_loop("warm-up", f"{server.url}/predict", body, rate, min(5.0, seconds / 4))
    before = server.memory()["rss"]
    result = loadgen.open_loop("soak", f"{server.url}/predict", body, rate, seconds)
    return SoakResult(sent=int(rate * seconds),
                      answered=sum(n for s, n in result.statuses.items() if s != "socket_error"),
                      statuses=result.statuses, p99_ms=result.latency_ms[99], rss_before=before,
                      rss_after=server.memory()["rss"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--share", type=float, default=0.8, help="share of measured capacity to send")
    args = parser.parse_args(argv)
    store = Path(os.environ.get("BENTOML_HOME", ROOT / ".bentoml"))
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        folder = Path(tmp)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "BENTOML_HOME": str(isolated_home(store, folder))}
        server = ServerProcess("service:Bundle", ROOT, env, folder)
        try:
            capacity = loadgen.closed_loop("capacity", f"{server.url}/predict", scenarios.bodies()["predict-wine"],
                                           32, 10, folder).throughput
            rate = round(capacity * args.share)
            print(f"capacity {capacity:.0f} req/s; soaking at {rate} req/s for {args.seconds:.0f} s")
            result = soak(server, rate, args.seconds)
        finally:
            server.stop()
    print(f"sent {result.sent}, answered {result.answered}, statuses {result.statuses}, "
          f"p99 {result.p99_ms:.1f} ms, RSS {result.rss_before / 2**20:.0f} -> {result.rss_after / 2**20:.0f} MiB "
          f"({result.rss_growth:+.1%}); {'OK' if result.ok() else 'FAILED'}")
    return 0 if result.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
