"""Issue: performance. Aged client connections, gRPC and HTTP: a connection stays on the worker that
accepted it, so connections opened at once (a load balancer's pool, a load generator) can all land on
one worker; aged, each reconnects and the kernel places it afresh. No call fails for it."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import sqlalchemy as sa
import tritonclient.grpc as triton
import yaml
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from common import datasets
from experiments.trafficstore import TRAFFIC
from harness.server import ServerProcess
from protocols.guard import AGE_JITTER
from tests import ROOT
from tests.e2e.conftest import server_env
from tests.e2e.test_grpc import DEADLINE_S, rows, typed_request, wait_for

pytestmark = pytest.mark.slow  # a server of its own

AGE_S = 0.5
"""Both ``max_connection_age_s`` of the ``aging`` server: a client reconnects about twice a second."""
LIGHT = "wine_sklearn_onnx:v2"
"""The ``aging`` server's one model: onnxruntime alone, so its two workers start quickly."""
EARLY_CHANNELS = 16
"""Channels opened before the workers serve: all on one worker by chance once in 2**15 starts."""


@pytest.fixture(scope="module")
def aging(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Two workers whose gRPC and HTTP connections are aged every ``AGE_S``, logging to a store of their
    own."""
    running = light_server(tmp_path_factory.mktemp("aging"), model_store,
                           {"service": {"max_connection_age_s": AGE_S}, "grpc": {"max_connection_age_s": AGE_S}})
    yield running
    running.stop()


def light_server(folder: Path, model_store: Path, settings: dict, wait: bool = True) -> ServerProcess:
    """Two workers serving only ``LIGHT``, with ``settings`` and a store of their own."""
    (folder / "config.yaml").write_text(yaml.safe_dump({
        **settings, "service": {"workers": 2, **settings.get("service", {})},
        "experiments": {"wine": {"salt": "w", "variants": [{"name": "onnx-v2", "model": LIGHT}]}}}))
    env = server_env(model_store, folder / "config.yaml", BUNDLE_STORE_URL=f"sqlite:///{folder / 'store.sqlite'}")
    return ServerProcess("service:Bundle", ROOT, env, folder, wait=wait)


def rows_per_worker(store_url: str) -> dict[str, int]:
    """Rows each worker answered, as its log writer copies them into the experiment store."""
    engine = sa.create_engine(store_url)
    try:
        with engine.connect() as conn:
            query = sa.select(TRAFFIC.c.worker, sa.func.sum(TRAFFIC.c.ok)).group_by(TRAFFIC.c.worker)
            return {worker: int(ok) for worker, ok in conn.execute(query)}
    finally:
        engine.dispose()


def answered_since(store_url: str, before: dict[str, int]) -> dict[str, int]:
    """Rows each worker answered since ``before`` (a :func:`rows_per_worker`), the workers that did."""
    now = rows_per_worker(store_url)
    return {worker: rows - before.get(worker, 0) for worker, rows in now.items()
            if rows > before.get(worker, 0)}


def test_aged_connections_bring_one_channel_to_every_worker_and_fail_no_call(aging: ServerProcess) -> None:
    """A channel keeps one connection; aged (HTTP/2 GOAWAY), it reconnects, so one client's calls reach
    both workers in turn."""
    client = triton.InferenceServerClient(aging.grpc_target)
    x = triton.InferInput("input", [1, 13], "FP32")
    x.set_data_from_numpy(rows("wine", 1))
    store_url = aging.env["BUNDLE_STORE_URL"]
    before = rows_per_worker(store_url)
    calls = 0

    def both_workers_answered() -> bool:
        nonlocal calls
        started = time.monotonic()
        while time.monotonic() - started < AGE_S:  # at least one aging per check, each call must succeed
            assert client.infer("wine", [x]).as_numpy("probabilities").shape == (1, 3)
            calls += 1
        return len(answered_since(store_url, before)) == 2

    try:  # ready means a worker's startup hooks ran: its gRPC server is listening
        wait_for(both_workers_answered)
        # every call answered and counted
        wait_for(lambda: sum(answered_since(store_url, before).values()) == calls)
    finally:
        client.close()


def test_aged_http_connections_close_after_an_answer_and_reach_every_worker(aging: ServerProcess) -> None:
    """One keep-alive connection is answered ``Connection: close`` once it is older than the age (less
    its jitter), never before; the client reconnects, and its requests reach both workers in turn, every one answered."""
    body = {"instances": [{"model": "wine", "inputs": datasets.load("wine").x_test[0].tolist()}]}
    store_url = aging.env["BUNDLE_STORE_URL"]
    before = rows_per_worker(store_url)
    closes: list[float] = []
    calls = 0
    with httpx.Client(base_url=aging.url, timeout=30, limits=httpx.Limits(max_connections=1)) as client:
        opened = time.monotonic()

        def both_workers_answered() -> bool:
            nonlocal calls, opened
            started = time.monotonic()
            while time.monotonic() - started < AGE_S:
                answer = client.post("/predict", json=body)
                assert answer.status_code == 200, answer.text
                calls += 1
                if answer.headers.get("connection") == "close":
                    closes.append(time.monotonic() - opened)
                    opened = time.monotonic()  # the next request opens a new connection
            return len(answered_since(store_url, before)) == 2

        wait_for(both_workers_answered)
    assert closes and min(closes) >= AGE_S * (1 - AGE_JITTER), closes
    wait_for(lambda: sum(answered_since(store_url, before).values()) == calls)


def test_channels_opened_while_the_workers_start_are_spread_over_them(model_store: Path, tmp_path: Path) -> None:
    """Every worker's gRPC listener exists before any worker starts (their parent makes them before it
    forks), so channels opened the moment the port takes connections, before either worker serves,
    land on both workers, though never aged: before, the first worker up took every one of them."""
    server = light_server(tmp_path, model_store, {"grpc": {"max_connection_age_s": None}}, wait=False)
    channels: list[grpc.Channel] = []
    try:
        deadline = time.monotonic() + DEADLINE_S * 4
        while True:  # the first moment the port takes a connection
            try:
                socket.create_connection(("127.0.0.1", server.grpc_port), timeout=1).close()
                break
            except OSError:
                assert server.process.poll() is None and time.monotonic() < deadline, server.output()
                time.sleep(0.01)
        # Each channel a connection of its own, opened now.
        channels = [grpc.insecure_channel(server.grpc_target, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(EARLY_CHANNELS)]
        for channel in channels:
            grpc.channel_ready_future(channel)
        server.wait_ready()
        store_url = server.env["BUNDLE_STORE_URL"]
        for channel in channels:
            answer = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                typed_request("wine", rows("wine", 1)), timeout=DEADLINE_S, wait_for_ready=True)
            assert answer.outputs
        wait_for(lambda: sum(rows_per_worker(store_url).values()) == EARLY_CHANNELS)
        assert len(rows_per_worker(store_url)) == 2, rows_per_worker(store_url)
    finally:
        for channel in channels:
            channel.close()
        server.stop()
