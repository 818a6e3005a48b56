"""One lever measured against another on a noisy machine: ``python -m bench.interleaved``.

Single runs here spread 0.6-1.4x, so a lever worth a few percent shows only in runs of every
configuration taken side by side. ``--servers`` names configurations (config.yaml overrides, JSON);
all of them are started first, then every round runs wrk on each in turn (``--connections``,
``--seconds``), the order rotated round by round so that no configuration always follows the same one.
Each run records req/s, p50 and p99, and the workers' CPU a request (user + system time of the worker
processes over the run). The table gives each configuration's medians and the median of its per-round
ratio to the first configuration, the number to quote; ``--out`` gets every run as interleaved.json.

    python -m bench.interleaved --servers '{"pinned": {}, "unpinned": {"service": {"pin_workers": false}}}'
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench import loadgen, scenarios
from common import config
from common.tables import markdown
from harness.server import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
WARM_S = 3.0
"""A first wrk run on each server, not recorded: its models' first calls and its connections' first accepts."""
SETTLE_S = 1.0
"""Before each recorded run, a short one: the previous server's load has drained from the caches and queues."""


def workers_cpu_s(server: ServerProcess) -> float:
    """User + system seconds of the server's worker processes so far."""
    return sum(sum(worker.cpu_times()[:2]) for worker in server.workers())


def measure(server: ServerProcess, url: str, body: loadgen.Body, connections: int, seconds: float,
            folder: Path) -> dict[str, Any]:
    loadgen.closed_loop("settle", url, body, connections, SETTLE_S, folder)
    before = workers_cpu_s(server)
    run = loadgen.closed_loop("run", url, body, connections, seconds, folder)
    used = workers_cpu_s(server) - before
    return {"req_s": round(run.throughput), "p50_ms": run.latency_ms[50], "p99_ms": run.latency_ms[99],
            "worker_cpu_us": round(used / run.requests * 1e6) if run.requests else None, "statuses": run.statuses}


def round_ratios(runs: list[dict[str, Any]], reference: str, name: str) -> list[float]:
    """Each round's req/s of ``name`` over ``reference``'s."""
    by = {(r["round"], r["server"]): r["req_s"] for r in runs}
    return [by[(n, name)] / by[(n, reference)] for n in sorted({r["round"] for r in runs})]


def summary(runs: list[dict[str, Any]], names: list[str]) -> list[list[Any]]:
    """Per configuration: medians over its runs, and the median per-round ratio of its req/s to the first's."""
    rows = []
    for name in names:
        mine = [r for r in runs if r["server"] == name]
        ratios = round_ratios(runs, names[0], name)
        rows.append([name, statistics.median(r["req_s"] for r in mine),
                     f"{statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f})",
                     f"{statistics.median(r['p50_ms'] for r in mine):.2f} / {statistics.median(r['p99_ms'] for r in mine):.2f}",
                     f"{statistics.median(r['p99_ms'] / r['p50_ms'] for r in mine):.2f}",
                     statistics.median(r["worker_cpu_us"] for r in mine)])
    return rows


HEADERS = ["configuration", "req/s, median", "x first, median of rounds (range)", "p50 / p99 ms, median",
           "p99 / p50, median", "worker CPU µs a request, median"]


def configurations(text: str) -> dict[str, dict[str, Any]]:
    """``--servers``: a JSON object of config.yaml overrides, each checked before any server starts."""
    try:
        servers = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err}): expected an object of config.yaml overrides") from None
    if not isinstance(servers, dict) or not all(isinstance(v, dict) for v in servers.values()):
        raise argparse.ArgumentTypeError('expected an object of config.yaml overrides, e.g. {"on": {}, "off": {...}}')
    with tempfile.TemporaryDirectory(prefix="interleaved-check-") as tmp:
        for name, overrides in servers.items():
            sections = [key for key, values in overrides.items() if not isinstance(values, dict)]
            if sections:
                raise argparse.ArgumentTypeError(f"configuration {name!r}: {sections[0]}: expected a mapping of "
                                                 "config.yaml keys")
            try:
                scenarios.server_config(overrides, Path(tmp) / "config.yaml")
            except config.ConfigError as err:
                raise argparse.ArgumentTypeError(f"configuration {name!r}: {err}") from None
    return servers


def run(configurations: dict[str, dict[str, Any]], rounds: int, connections: int, seconds: float, path: str,
        body: loadgen.Body, store: Path) -> list[dict[str, Any]]:
    """Every configuration started and warmed first, then ``rounds`` rounds of one recorded run on each,
    the order rotated a round; each run as :func:`measure` gives it, with its round and server."""
    names = list(configurations)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="interleaved-") as tmp:
        servers: dict[str, ServerProcess] = {}
        try:
            for number, name in enumerate(names):
                folder = Path(tmp) / str(number)
                folder.mkdir()
                servers[name] = scenarios.start_server("service:Bundle", configurations[name], store, folder)
            for server in servers.values():
                loadgen.closed_loop("warm", server.url + path, body, connections, WARM_S, Path(tmp))
            with tqdm(total=rounds * len(names), desc="interleaved runs", unit="run") as bar:
                for number in range(rounds):
                    for name in names[number % len(names):] + names[:number % len(names)]:
                        server = servers[name]
                        runs.append({"round": number, "server": name,
                                     **measure(server, server.url + path, body, connections, seconds, Path(tmp))})
                        bar.update()
        finally:
            for server in servers.values():
                server.stop()
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.interleaved", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=configurations, required=True,
                        help='JSON object: name -> config.yaml overrides, e.g. {"on": {}, "off": {"store": '
                             '{"log_predictions": false}}}; the first is the reference')
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0, help="each recorded run")
    parser.add_argument("--path", default="/predict")
    parser.add_argument("--body", default="predict-wine", help="a body of bench.scenarios.bodies()")
    parser.add_argument("--out", type=Path, help="folder for interleaved.json")
    args = parser.parse_args(argv)
    names = list(args.servers)
    if len(names) < 2 or args.rounds < 1 or args.seconds <= 0:
        parser.error("--servers needs at least 2 configurations, --rounds at least 1, --seconds above 0")
    store = Path(os.environ.get("BENTOML_HOME", ROOT / ".bentoml"))
    runs = run(args.servers, args.rounds, args.connections, args.seconds, args.path, scenarios.bodies()[args.body],
               store)
    print(markdown(HEADERS, summary(runs, names)))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        settings = {**vars(args), "out": str(args.out)}
        (args.out / "interleaved.json").write_text(json.dumps({"settings": settings, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
