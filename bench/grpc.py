"""gRPC against REST for the same model in one run: OIP ``ModelInfer`` with binary tensors against ``/predict``.

``python -m bench.grpc`` starts one service (2 workers, as configured), then alternates the two
protocols at each concurrency, each driven by the same kind of client (Python asyncio: ``grpc.aio``
and aiohttp) so that neither side's generator is faster by construction; the generator shares the 2
cores with the server and its CPU share is reported. Results: ``bench/results/<date>/grpc.md`` and
``grpc.json``.

gRPC multiplexes every call of a channel over one connection, and the workers share the port by
``SO_REUSEPORT``, which spreads connections, not calls: the client opens several channels (each with
its own connection), one per concurrent caller as aiohttp's pool does.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from collections.abc import Awaitable, Callable

import aiohttp
import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from bench.loadgen import LoadResult
from common import datasets
from harness.server import ServerProcess, isolated_home

ROOT = Path(__file__).resolve().parent.parent
MODEL = "wine"
CONCURRENCY = (1, 32)
REPEATS = 3
PERCENTILES = (50.0, 90.0, 99.0)
Call = Callable[[], Awaitable[bool]]


async def closed_loop(name: str, call: Call, concurrency: int, seconds: float) -> LoadResult:
    """``concurrency`` callers, each sending its next request when the last is answered, for ``seconds``."""
    latencies: list[float] = []
    failures = 0
    cpu_before = _cpu_s()
    started = time.perf_counter()
    deadline = started + seconds

    async def caller() -> None:
        nonlocal failures
        while (sent := time.perf_counter()) < deadline:
            ok = await call()
            latencies.append(time.perf_counter() - sent)
            failures += not ok

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    duration = time.perf_counter() - started
    return LoadResult(name, "closed", concurrency, None, len(latencies), duration,
                      {"ok": len(latencies) - failures, "error": failures},
                      {p: float(np.percentile(latencies, p) * 1000) for p in PERCENTILES},
                      (_cpu_s() - cpu_before) / duration)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rest_call(session: aiohttp.ClientSession, url: str, row: list[float]) -> Call:
    body = json.dumps({"instances": [{"model": MODEL, "inputs": row}]}).encode()

    async def call() -> bool:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
            await response.read()
            return response.status == 200

    return call


def grpc_call(stubs: list[service_pb2_grpc.GRPCInferenceServiceStub], row: np.ndarray) -> Call:
    """OIP ModelInfer with the row as ``raw_input_contents``, as tritonclient sends it; round robin over
    the channels."""
    request = pb.ModelInferRequest(model_name=MODEL, raw_input_contents=[row.astype("<f4").tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=[1, len(row)])
    turn = iter(range(1 << 62))

    async def call() -> bool:
        try:
            await stubs[next(turn) % len(stubs)].ModelInfer(request)
        except grpc.aio.AioRpcError:
            return False
        return True

    return call


async def compare(http_url: str, grpc_target: str, seconds: float, concurrencies: tuple[int, ...] = CONCURRENCY,
                  repeats: int = REPEATS) -> list[LoadResult]:
    """Both protocols at each concurrency, alternated ``repeats`` times; the median run of each."""
    row = datasets.load(MODEL).x_test[0]
    channels = [grpc.aio.insecure_channel(grpc_target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(max(concurrencies))]
    connector = aiohttp.TCPConnector(limit=max(concurrencies))
    results = []
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            calls = {"/predict (REST, JSON)": rest_call(session, f"{http_url}/predict", row.tolist())}
            for concurrency in concurrencies:
                used = channels[:concurrency]  # a connection per caller, as aiohttp's pool opens
                calls["gRPC OIP (binary)"] = grpc_call([service_pb2_grpc.GRPCInferenceServiceStub(c) for c in used],
                                                       row)
                for name, call in calls.items():  # warm: connections open, batch queues measured
                    await closed_loop(name, call, concurrency, min(seconds, 1.0))
                runs: dict[str, list[LoadResult]] = {name: [] for name in calls}
                for _ in range(repeats):
                    for name, call in calls.items():
                        runs[name].append(await closed_loop(f"{name} c={concurrency}", call, concurrency, seconds))
                for name, repeated in runs.items():
                    median = sorted(repeated, key=lambda r: r.throughput)[len(repeated) // 2]
                    median.extra = {"runs_rps": [round(r.throughput) for r in repeated]}
                    results.append(median)
    finally:
        for channel in channels:
            await channel.close()
    return results


def markdown(results: list[LoadResult]) -> str:
    lines = ["| protocol | concurrency | req/s (median of runs) | runs | p50 ms | p90 ms | p99 ms | errors | client CPU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name.rsplit(' c=', 1)[0]} | {r.concurrency} | {r.throughput:.0f} | "
                     f"{r.extra['runs_rps']} | {r.latency_ms[50.0]:.2f} | {r.latency_ms[90.0]:.2f} | "
                     f"{r.latency_ms[99.0]:.2f} | {r.statuses['error']} | {r.generator_cpu:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="per run")
    parser.add_argument("--out", type=Path, help="default: bench/results/<date>")
    args = parser.parse_args(argv)
    out = args.out or ROOT / "bench" / "results" / datetime.date.today().isoformat()
    out.mkdir(parents=True, exist_ok=True)
    store = Path(os.environ.get("BENTOML_HOME", ROOT / ".bentoml"))
    with tempfile.TemporaryDirectory(prefix="bench-grpc-") as tmp:
        folder = Path(tmp)
        shutil.copy(ROOT / "config.yaml", folder / "config.yaml")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "BENTOML_HOME": str(isolated_home(store, folder)),
               "BUNDLE_CONFIG": str(folder / "config.yaml")}
        server = ServerProcess("service:Bundle", ROOT, env, folder)
        try:
            results = asyncio.run(compare(server.url, server.grpc_target, args.seconds))
        finally:
            server.stop()
    table = markdown(results)
    (out / "grpc.md").write_text(f"# gRPC against REST, model {MODEL}, one row per request\n\n{__doc__}\n{table}")
    (out / "grpc.json").write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
