"""A load spike and what latency does after it: ``python -m bench.spike``.

Single-row ``/predict`` (wine) on a fixed schedule: the base rate, then ``--factor`` times it for
``--spike-seconds``, then the base rate again. Latency counts from each request's scheduled time (no
coordinated omission). Printed per 1-s window, with the verdict of the target: p99 back under
``--p99-ms`` within one second of the spike's end. ``--url`` measures a running server; without it the
command starts one on the model store (``BENTOML_HOME``), as the soak does.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench import loadgen, scenarios
from common.tables import markdown

ROOT = Path(__file__).resolve().parent.parent
BEFORE_S = 5.0
AFTER_S = 10.0
WINDOW_S = 1.0
WARM_S = 3.0
RATE, FACTOR, SPIKE_S = 200.0, 5.0, 10.0
"""The performance issue's spike: 5x for 10 s."""
TARGET_P99_MS = 50.0
"""The performance issue's target: p99 back under this within one second of the spike's end."""


def schedule(rate: float, factor: float, spike_s: float) -> list[float]:
    """Send offsets: ``BEFORE_S`` at ``rate``, ``spike_s`` at ``rate * factor``, ``AFTER_S`` at ``rate``."""
    before = list(np.arange(0, BEFORE_S, 1 / rate))
    spike = list(BEFORE_S + np.arange(0, spike_s, 1 / (rate * factor)))
    after = list(BEFORE_S + spike_s + np.arange(0, AFTER_S, 1 / rate))
    return [float(t) for t in before + spike + after]


def windows(sent: list[loadgen.Sent], spike_end_s: float) -> list[dict]:
    """p50 and p99 per window of scheduled time, named by its start relative to the spike's end."""
    rows = []
    last = max(s.scheduled_s for s in sent)
    start = 0.0
    while start <= last:
        inside = [s for s in sent if start <= s.scheduled_s < start + WINDOW_S]
        if inside:
            latencies = [s.latency_ms for s in inside]
            rows.append({"from_end_s": round(start - spike_end_s, 1), "requests": len(inside),
                         "non_200": sum(s.status != "200" for s in inside),
                         "p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99))})
        start += WINDOW_S
    return rows


@dataclass(frozen=True)
class Spike:
    """One spike as sent (base rate, factor, seconds) and its 1-s windows (:func:`windows`)."""
    rate: float
    factor: float
    seconds: float
    windows: list[dict]


def run(url: str, rate: float, factor: float, spike_s: float) -> Spike:
    """Warm the server at the base rate, then send the spike's schedule to ``url``'s ``/predict``."""
    body = scenarios.bodies()["predict-wine"]
    loadgen.open_loop("warm-up", f"{url}/predict", body, rate, WARM_S)
    sent = loadgen.on_schedule(f"{url}/predict", body, schedule(rate, factor, spike_s)).requests
    return Spike(rate, factor, spike_s, windows(sent, BEFORE_S + spike_s))


def after_spike(rows: list[dict]) -> dict:
    """The first window that starts at least one window after the spike's end: the target's."""
    return next(r for r in rows if r["from_end_s"] >= WINDOW_S)


HEADERS = ["s from spike end", "requests", "non-200", "p50 ms", "p99 ms"]


def table_rows(rows: list[dict]) -> list[list]:
    return [[r["from_end_s"], r["requests"], r["non_200"], r["p50_ms"], r["p99_ms"]] for r in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.spike", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--rate", type=float, default=RATE, help="base rate, requests per second")
    parser.add_argument("--factor", type=float, default=FACTOR, help="the spike's rate over the base rate")
    parser.add_argument("--spike-seconds", type=float, default=SPIKE_S)
    parser.add_argument("--p99-ms", type=float, default=TARGET_P99_MS, help="target p99 one second after the spike")
    args = parser.parse_args(argv)
    if min(args.rate, args.factor, args.spike_seconds, args.p99_ms) <= 0:
        parser.error("--rate, --factor, --spike-seconds and --p99-ms must be above 0")
    with tempfile.TemporaryDirectory(prefix="spike-") as tmp:
        server = None
        if args.url is None:
            store = Path(os.environ.get("BENTOML_HOME", ROOT / ".bentoml"))
            server = scenarios.start_server("service:Bundle", {}, store, Path(tmp))
        try:
            rows = run(args.url or server.url, args.rate, args.factor, args.spike_seconds).windows
        finally:
            if server is not None:
                server.stop()
    print(markdown(HEADERS, table_rows(rows)))
    after = after_spike(rows)
    verdict = "met" if after["p99_ms"] <= args.p99_ms else "missed"
    print(f"p99 from {after['from_end_s']:g} s after the spike's end: {after['p99_ms']:.1f} ms "
          f"(target {args.p99_ms:g} ms): {verdict}")
    return 0 if verdict == "met" else 1


if __name__ == "__main__":
    sys.exit(main())
