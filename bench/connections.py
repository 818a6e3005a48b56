"""Where kept-alive connections end up, with and without aging: ``python -m bench.connections``.

BentoML's workers share one listening socket and a connection stays on the worker that accepted it,
so connections opened at once can all land on one worker, and without ``service.max_connection_age_s``
they stay there for as long as the client keeps them (a load balancer's pool: hours). One server per
age (``--ages``, ``null`` = never), all started first, then two measurements:

- steady: ``--rounds`` rounds of wrk runs (``--connections``, ``--run-seconds`` each), the servers in
  turn: req/s of each run and the busiest worker's share of the workers' CPU (0.5 = even);
- restart: one worker of each server killed, wrk opens its connections at once and runs
  ``--seconds``; every second, the busiest worker's share (the replacement's model loading counts
  as CPU too).

Printed as tables; ``--out`` gets connections.json and connections.png (the restart, over time).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from tqdm import tqdm

from bench import loadgen, plots, scenarios
from common.tables import markdown
from harness.server import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_S = 1.0
SETTLED_S = 10.0
"""The verdict reads the last this many seconds of the run: the replacement worker is long up."""
EVEN_SHARE = 0.6
"""A busiest-worker share at or under this counts as spread (0.5 is perfectly even)."""
UNEVEN_SHARE = 0.65
"""A steady run whose busiest worker used more than this share of the CPU measured mostly one worker."""


@functools.cache
def wine_body() -> loadgen.Body:
    """One wine row for ``/predict``, as the main benchmark sends it."""
    return scenarios.bodies()["predict-wine"]


def busiest_share(server: ServerProcess, seconds: float, stop: threading.Event) -> list[float]:
    """Every ``SAMPLE_S``, the busiest worker's share of the CPU the workers used; workers are listed
    afresh each time (the killed one goes, its replacement comes)."""
    last: dict[int, float] = {}
    shares = []
    deadline = time.monotonic() + seconds
    while not stop.is_set() and time.monotonic() < deadline:
        stop.wait(SAMPLE_S)
        used = {}
        for worker in server.workers():
            try:
                cpu = sum(worker.cpu_times()[:2])
            except psutil.NoSuchProcess:  # killed between the listing and now
                continue
            used[worker.pid] = cpu - last.get(worker.pid, cpu)
            last[worker.pid] = cpu
        total = sum(used.values())
        shares.append(max(used.values()) / total if total > 0 and len(used) > 1 else 1.0)
    return shares


def start(age: float | None, store: Path, folder: Path) -> ServerProcess:
    """A warm server with ``service.max_connection_age_s: age``."""
    server = scenarios.start_server("service:Bundle", {"service": {"max_connection_age_s": age}}, store,
                                    folder)
    loadgen.open_loop("warm-up", f"{server.url}/predict", wine_body(), 100, 3.0)
    return server


def steady(server: ServerProcess, connections: int, seconds: float, folder: Path) -> dict:
    """One wrk run: its req/s and the busiest worker's share of the CPU the workers used."""
    workers = server.workers()
    before = [sum(p.cpu_times()[:2]) for p in workers]
    result = loadgen.closed_loop("steady", f"{server.url}/predict", wine_body(), connections, seconds, folder)
    used = [sum(p.cpu_times()[:2]) - b for p, b in zip(workers, before)]
    server.wait_idle()
    return {"req_s": round(result.throughput), "busiest_share": round(max(used) / max(sum(used), 1e-9), 3),
            "non_2xx": result.non_2xx}


def restart(server: ServerProcess, connections: int, seconds: float, folder: Path) -> dict:
    """One worker killed, then the load: where the connections opened meanwhile end up."""
    os.kill(server.workers()[0].pid, signal.SIGKILL)
    stop = threading.Event()
    shares: list[float] = []
    sampler = threading.Thread(target=lambda: shares.extend(busiest_share(server, seconds, stop)))
    sampler.start()
    result = loadgen.closed_loop("restart", f"{server.url}/predict", wine_body(), connections, seconds,
                                 folder)
    stop.set()
    sampler.join()
    return {"req_s": round(result.throughput), "statuses": result.statuses,
            "p50_ms": result.latency_ms.get(50.0), "p99_ms": result.latency_ms.get(99.0),
            "busiest_share": [round(s, 3) for s in shares],
            "settled_share": round(statistics.median(shares[-int(SETTLED_S / SAMPLE_S):]), 3)}


def label(age: float | None) -> str:
    return "null" if age is None else f"{age:g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.connections", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ages", type=json.loads, default=[None, 1.0],
                        help="JSON list of service.max_connection_age_s values to compare "
                             "(default: [null, 1])")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6, help="steady rounds (0: none)")
    parser.add_argument("--run-seconds", type=float, default=6.0, help="each steady run")
    parser.add_argument("--seconds", type=float, default=45.0, help="the restart's wrk run, from the kill")
    parser.add_argument("--out", type=Path, help="folder for connections.json and connections.png")
    args = parser.parse_args(argv)
    if args.seconds <= SETTLED_S or args.connections < 2 or args.rounds < 0 or args.run_seconds <= 0:
        parser.error(f"--seconds must exceed {SETTLED_S:g}, --connections be at least 2, "
                     "--rounds at least 0, --run-seconds above 0")
    store = Path(os.environ.get("BENTOML_HOME", ROOT / ".bentoml"))
    with tempfile.TemporaryDirectory(prefix="connections-") as tmp:
        folders = [Path(tmp) / str(i) for i in range(len(args.ages))]
        servers: list[ServerProcess] = []
        try:
            for age, folder in zip(args.ages, folders):
                folder.mkdir()
                servers.append(start(age, store, folder))
            runs: list[list[dict]] = [[] for _ in servers]
            for _ in tqdm(range(args.rounds), desc="steady rounds", unit="round"):
                for server, folder, done in zip(servers, folders, runs):
                    done.append(steady(server, args.connections, args.run_seconds, folder))
            restarts = [restart(server, args.connections, args.seconds, folder)
                        for server, folder in zip(tqdm(servers, desc="restarts", unit="server"), folders)]
        finally:
            for server in servers:
                server.stop()
    rows = [{"age_s": age, "steady": done, **after} for age, done, after in zip(args.ages, runs, restarts)]
    if args.rounds:
        print(markdown(["max_connection_age_s", "steady runs", "median req/s", "slowest / fastest req/s",
                        f"runs with a worker over {UNEVEN_SHARE:.0%} of the CPU"],
                       [[label(r["age_s"]), len(r["steady"]),
                         statistics.median(x["req_s"] for x in r["steady"]),
                         f"{min(x['req_s'] for x in r['steady'])} / {max(x['req_s'] for x in r['steady'])}",
                         sum(x["busiest_share"] > UNEVEN_SHARE for x in r["steady"])] for r in rows]))
    print(markdown(["max_connection_age_s", "after a restart: req/s", "answers", "p50 / p99 ms",
                    f"busiest worker's CPU share, last {SETTLED_S:g} s", "spread"],
                   [[label(r["age_s"]), r["req_s"], r["statuses"], f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}",
                     r["settled_share"], "yes" if r["settled_share"] <= EVEN_SHARE else "no"] for r in rows]))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "connections.json").write_text(json.dumps(rows, indent=1))
        plots.busiest_share({f"max_connection_age_s: {label(r['age_s'])}": r["busiest_share"] for r in rows},
                            SAMPLE_S, args.out / "connections.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
