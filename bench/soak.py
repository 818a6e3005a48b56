"""Soak: hold a fixed request rate for minutes and check that memory stays flat and nothing is lost.

``python -m bench.soak`` starts a server, finds its capacity for single-row /predict with the same
open-loop client the soak uses, then sends 80% of it on a fixed schedule for 5 minutes.

Capacity is searched, not taken from one closed-loop run: the client shares the 2 cores with the
server (its CPU is part of the cost of every request), and a closed-loop run measures one worker or
two depending on how the kernel spread its keep-alive connections, so one figure can be 1.5x another.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from bench import loadgen, scenarios
from common import config
from harness.server import ServerProcess, isolated_home

ROOT = Path(__file__).resolve().parent.parent
MAX_RSS_GROWTH = 0.10
RAMP = 1.25
"""Each capacity step offers this many times the last rate that held."""


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
        return (0 < self.sent == self.answered and set(self.statuses) <= {"200"}
                and self.rss_growth < MAX_RSS_GROWTH)


def holds(result: loadgen.LoadResult, p99_budget_ms: float) -> bool:
    """Every request answered 200 within the budget: the server kept up with the rate."""
    return set(result.statuses) <= {"200"} and result.latency_ms[99] <= p99_budget_ms


def capacity(server: ServerProcess, start: float, step_s: float, p99_budget_ms: float,
             bisections: int = 2) -> tuple[float, list[tuple[float, bool]]]:
    """The highest fixed rate that holds (ramp up by RAMP until a step fails, then bisect), and every
    step tried as (rate, held)."""
    url, body = f"{server.url}/predict", scenarios.bodies()["predict-wine"]
    steps: list[tuple[float, bool]] = []
    with tqdm(desc="capacity", unit="step") as bar:

        def step(rate: float) -> bool:
            result = loadgen.open_loop("capacity", url, body, rate, step_s)
            held = holds(result, p99_budget_ms)
            steps.append((rate, held))
            bar.update()
            bar.write(f"  {rate:6.0f} req/s: p99 {result.latency_ms[99]:7.1f} ms, {result.statuses}, "
                      f"{'holds' if held else 'fails'}")
            return held

        good, rate = 0.0, start
        while step(rate):
            good, rate = rate, rate * RAMP
        bad = rate
        for _ in range(bisections):
            middle = (good + bad) / 2
            good, bad = (middle, bad) if step(middle) else (good, middle)
    return good, steps


def soak(server: ServerProcess, rate: float, seconds: float) -> SoakResult:
    body = scenarios.bodies()["predict-wine"]
    loadgen.open_loop("warm-up", f"{server.url}/predict", body, rate, min(5.0, seconds / 4))
    before = server.memory()["rss"]
    result = loadgen.open_loop("soak", f"{server.url}/predict", body, rate, seconds)
    return SoakResult(sent=int(rate * seconds),
                      answered=sum(n for s, n in result.statuses.items() if s != "socket_error"),
                      statuses=result.statuses, p99_ms=result.latency_ms[99], rss_before=before,
                      rss_after=server.memory()["rss"])


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:  # nan included
        raise argparse.ArgumentTypeError(f"{text} is not a number above 0")
    return value


def _share(text: str) -> float:
    value = _positive(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text} is above 1 (the whole capacity)")
    return value


def main(argv: list[str] | None = None) -> int:
    budget_ms = config.load().batching.max_latency_ms / 2
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=_positive, default=300)
    parser.add_argument("--share", type=_share, default=0.8, help="share of the measured capacity to send, 0 < share <= 1")
    parser.add_argument("--step-seconds", type=_positive, default=15, help="length of each capacity step")
    parser.add_argument("--p99-ms", type=_positive, default=budget_ms,
                        help="a capacity step holds when every answer is 200 and p99 stays under this "
                             "(default: half of batching.max_latency_ms, beyond which BentoML sheds)")
    args = parser.parse_args(argv)
    store = Path(os.environ.get("BENTOML_HOME", ROOT / ".bentoml"))
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        folder = Path(tmp)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "BENTOML_HOME": str(isolated_home(store, folder))}
        server = ServerProcess("service:Bundle", ROOT, env, folder)
        try:
            found, _ = capacity(server, start=100, step_s=args.step_seconds, p99_budget_ms=args.p99_ms)
            rate = round(found * args.share)
            print(f"capacity {found:.0f} req/s; soaking at {rate} req/s for {args.seconds:.0f} s")
            result = soak(server, rate, args.seconds)
        finally:
            server.stop()
    print(f"sent {result.sent}, answered {result.answered}, statuses {result.statuses}, "
          f"p99 {result.p99_ms:.1f} ms, RSS {result.rss_before / 2**20:.0f} -> {result.rss_after / 2**20:.0f} MiB "
          f"({result.rss_growth:+.1%}); {'OK' if result.ok() else 'FAILED'}")
    return 0 if result.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
