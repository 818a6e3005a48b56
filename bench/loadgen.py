"""Load generators: wrk for closed-loop runs, an asyncio client for open-loop (fixed-rate) runs.

Both report what they cost: the generator shares the 2 cores with the server, so its CPU share is
part of every figure.
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
import resource
import shutil
import struct
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import psutil

WRK_SCRIPT = Path(__file__).with_name("wrk.lua")
WRK_MANY_SCRIPT = Path(__file__).with_name("wrk_many.lua")
GRPC_OK = "OK"
"""A gRPC scenario's answers that the server counted as answered (every gRPC answer is HTTP 200: its
status is in the trailers, which h2load does not read)."""


@dataclass
class Body:
    content: bytes
    content_type: str
    many: bool = False
    """``content`` is one body a line, sent in turn by the closed loop (the open loop sends the first)."""

    def first(self) -> Body:
        return Body(self.content.split(b"\n", 1)[0], self.content_type) if self.many else self


@dataclass
class LoadResult:
    name: str
    mode: str
    concurrency: int | None
    rate: float | None
    requests: int
    duration_s: float
    statuses: dict[str, int]
    latency_ms: dict[float, float]
    generator_cpu: float
    """Share of one core the load generator used."""
    extra: dict = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    def path_is_sweep(self) -> bool:
        """The single-row /predict runs with 2 workers and batching, at any concurrency."""
        return self.extra.get("path") == "/predict" and self.name.split(" c=")[0] in ("bare", "predict wine")

    @property
    def non_2xx(self) -> int:
        return sum(n for s, n in self.statuses.items() if not s.startswith("2") and s != GRPC_OK)


def require_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit("wrk is not installed: `make bench` installs it (apt-get install -y wrk)")
    return path


def closed_loop(name: str, url: str, body: Body, concurrency: int, seconds: float,
                workdir: Path) -> LoadResult:
    """``concurrency`` connections, each sending its next request as soon as its answer arrives."""
    body_file = workdir / f"{name}.body"
    body_file.write_bytes(body.content)
    script = WRK_MANY_SCRIPT if body.many else WRK_SCRIPT
    command = [require_wrk(), "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s",
               str(script), url, "--", str(body_file), body.content_type]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    output = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    line = next((ln for ln in output.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result:\n{output}")
    data = json.loads(line.removeprefix("WRK_JSON "))
    statuses = {k: n for k, n in (("2xx", data["requests"] - data["non_2xx"]), ("non-2xx", data["non_2xx"])) if n}
    if data["socket_errors"] or data["timeouts"]:
        statuses["socket_error"] = data["socket_errors"] + data["timeouts"]
    return LoadResult(name=name, mode="closed", concurrency=concurrency, rate=None,
                      requests=data["requests"], duration_s=data["duration_s"], statuses=statuses,
                      latency_ms={p: v for p, v in data["latency_ms"]},
                      generator_cpu=cpu_s / data["duration_s"] if data["duration_s"] else 0.0)


H2LOAD_LATENCY_POINTS = (1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 97, 99, 99.5, 99.9)
"""The percentiles wrk.lua reports, for the same columns."""


def grpc_message(message: bytes) -> bytes:
    """One gRPC request body: the message behind its length prefix (not compressed)."""
    return struct.pack(">BI", 0, len(message)) + message


def grpc_closed_loop(name: str, url: str, body: Body, concurrency: int, seconds: float,
                     workdir: Path) -> LoadResult:
    """gRPC's closed loop: h2load (nghttp2's load generator, in C as wrk is) sends ``body`` (one gRPC
    message) to the method ``url`` names over ``concurrency`` connections, one call in flight on each,
    as wrk does over HTTP/1.1. The latencies come from its per-request log; its counts are by HTTP
    status, so the caller replaces them with the server's count of answered rows."""
    h2load = shutil.which("h2load")
    if h2load is None:
        raise SystemExit("h2load is not installed: `make tools` installs it (apt-get install -y nghttp2-client)")
    body_file, log_file = workdir / f"{name}.grpc", workdir / f"{name}.h2load.log"
    body_file.write_bytes(body.content)
    command = [h2load, f"-c{concurrency}", "-m1", "-D", str(max(1, round(seconds))), "-d", str(body_file),
               "-H", f"content-type: {body.content_type}", "-H", "te: trailers", "--log-file", str(log_file), url]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    output = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    finished = re.search(r"finished in ([\d.]+)s", output)
    counts = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
                       r"(\d+) errored, (\d+) timeout", output)
    if finished is None or counts is None:
        raise RuntimeError(f"h2load gave no result:\n{output}")
    duration_s = float(finished.group(1))
    total, succeeded, failed, errored, timeouts = map(int, counts.groups())
    # The log: one request a line, tab-separated: start (us since the epoch), HTTP status, duration (us).
    latencies = [int(line.split("\t")[2]) / 1000 for line in log_file.read_text().splitlines() if line]
    percentiles = np.percentile(latencies, H2LOAD_LATENCY_POINTS) if latencies else [0.0] * len(H2LOAD_LATENCY_POINTS)
    statuses = {k: n for k, n in (("2xx", succeeded), ("non-2xx", failed), ("socket_error", errored + timeouts)) if n}
    return LoadResult(name=name, mode="closed", concurrency=concurrency, rate=None, requests=succeeded,
                      duration_s=duration_s, statuses=statuses,
                      latency_ms=dict(zip(H2LOAD_LATENCY_POINTS, map(float, percentiles))),
                      generator_cpu=((after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)) / duration_s,
                      extra={"requests_sent": total})


def open_loop(name: str, url: str, body: Body, rate: float, seconds: float) -> LoadResult:
    """Requests sent on a fixed schedule whatever the answers do; latency counts from the scheduled
    time, so a server that falls behind shows its queueing instead of hiding it (no coordinated
    omission)."""
    sent = on_schedule(url, body.first(), [i / rate for i in range(int(rate * seconds))])
    latencies = [s.latency_ms for s in sent.requests]
    points = [1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 97, 99, 99.5, 99.9]
    percentiles = np.percentile(latencies, points) if latencies else [0.0] * len(points)
    return LoadResult(name=name, mode="open", concurrency=None, rate=rate, requests=len(latencies),
                      duration_s=sent.duration_s, statuses=dict(Counter(s.status for s in sent.requests)),
                      latency_ms=dict(zip(points, map(float, percentiles))),
                      generator_cpu=sent.cpu_s / sent.duration_s)


@dataclass(frozen=True)
class Sent:
    scheduled_s: float
    """When the request was due, from the start of the schedule."""
    latency_ms: float
    """From the scheduled time to the answer."""
    status: str


@dataclass(frozen=True)
class Schedule:
    requests: list[Sent]
    duration_s: float
    cpu_s: float
    """The generator's own CPU time: on two cores it competes with the server."""


def on_schedule(url: str, body: Body, offsets_s: list[float]) -> Schedule:
    """Send one request at each offset (seconds from the start), whatever the answers do."""
    # The generator's own full collections (0.1-0.3 s over what the benchmark imports and the tasks
    # in flight) would pause the schedule and then send the missed requests as one burst.
    gc.collect()
    gc.freeze()
    try:
        return asyncio.run(_on_schedule(url, body, offsets_s))
    finally:
        gc.unfreeze()


async def _on_schedule(url: str, body: Body, offsets_s: list[float]) -> Schedule:
    sent: list[Sent] = []
    connector = aiohttp.TCPConnector(limit=512)
    timeout = aiohttp.ClientTimeout(total=30)
    me = psutil.Process()
    cpu_before = sum(me.cpu_times()[:2])
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(offset: float, scheduled: float) -> None:
            try:
                async with session.post(url, data=body.content,
                                        headers={"Content-Type": body.content_type}) as response:
                    await response.read()
                    status = str(response.status)
            except (TimeoutError, aiohttp.ClientError):
                status = "socket_error"
            sent.append(Sent(offset, (time.perf_counter() - scheduled) * 1000, status))

        start = time.perf_counter() + 0.05
        in_flight: set[asyncio.Task[None]] = set()  # finished requests are let go: fewer objects to collect
        for offset in offsets_s:
            scheduled = start + offset
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(offset, scheduled))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        await asyncio.gather(*in_flight)
        duration = time.perf_counter() - start
    return Schedule(sorted(sent, key=lambda s: s.scheduled_s), duration, sum(me.cpu_times()[:2]) - cpu_before)
