"""Issue: reliability. Faults at start-up, a runner that raises, overload (REST and gRPC), a killed worker, a soak,
a request over the timeout."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import psutil
import pytest
import yaml
from PIL import Image
from tritonclient.grpc import service_pb2 as oip_pb2
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from bench import soak
from common import datasets
from harness.server import ServerProcess
from protocols.grpc_guard import RETRY_AFTER
from tests.e2e.conftest import ROOT, Server

pytestmark = pytest.mark.slow  # servers, databases or builds of its own

POISON_TAG = "wine_poison_onnx:v1"
POISON_ALCOHOL = 5000.0
STOP_WITH_PARENT_S = 30
"""Workers whose parent died get SIGTERM (``serving/prefork.py``) and stop gracefully within this."""
"""The poison model looks up a table row by the first feature: 5000 is past its 1000 rows."""


def save_poison_model() -> None:
    """A real ONNX model with a real failure mode: an out-of-range Gather on some inputs."""
    import onnx

    from common import store
    from tests.onnx_models import lookup_model

    data = datasets.load("wine")
    table = np.random.default_rng(0).normal(size=(1000, 3)).astype(np.float32)
    model = lookup_model(table, features=13)
    logits = table[data.x_test[:, 0].astype(np.int64)]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    store.save(POISON_TAG,
               labels={"framework": "onnx", "runtime": "onnxruntime", "task": "classification", "family": "wine",
                       "version": "v1", "precision": "fp32"},
               metadata={"input_shape": data.input_shape, "classes": data.classes, "dtype": "float32",
                         "feature_names": data.feature_names, "onnx_input": "input",
                         "onnx_probabilities_output": "probabilities"},
               write=lambda folder: (onnx.save(model, folder / "model.onnx"), "model.onnx")[1], test_probs=probs)


def private_home(model_store: Path, folder: Path, copied: tuple[str, ...] = ()) -> Path:
    """A BENTOML_HOME whose models are links to the test store's, except ``copied`` ones (real copies,
    which a test may damage) and whatever the test adds, so the shared store never changes."""
    home = folder / "bentoml_home"
    (home / "models").mkdir(parents=True)
    for name in (model_store / "models").iterdir():
        if name.name in copied:
            shutil.copytree(name, home / "models" / name.name)
        else:
            (home / "models" / name.name).symlink_to(name)
    return home


def config_with(folder: Path, **changes: dict) -> Path:
    data = yaml.safe_load((ROOT / "config.yaml").read_text())
    for section, values in changes.items():
        data[section] = {**data.get(section, {}), **values}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def start(folder: Path, home: Path, config: Path) -> Server:
    env = {**os.environ, "BENTOML_HOME": str(home), "BUNDLE_CONFIG": str(config)}
    return Server("service:Bundle", ROOT, env, folder, timeout_s=120)


def refused(folder: Path, home: Path, config: Path) -> str:
    with pytest.raises(RuntimeError) as failure:
        start(folder, home, config).stop()
    return str(failure.value)


def test_missing_model_refuses_to_start_naming_tag_and_fix(model_store: Path, tmp_path: Path) -> None:
    config = config_with(tmp_path, experiments={"wine": {"salt": "s", "variants": [
        {"name": "gone", "model": "wine_sklearn:v9", "weight": 1}]}})
    message = refused(tmp_path, private_home(model_store, tmp_path), config)
    assert "wine_sklearn:v9" in message and "make models" in message


def test_invalid_configuration_refuses_to_start_naming_the_key(model_store: Path, tmp_path: Path) -> None:
    message = refused(tmp_path, private_home(model_store, tmp_path), config_with(tmp_path, batching={"max_batch": 8}))
    assert "batching.max_batch" in message


@pytest.fixture(scope="module")
def faults(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with a poison experiment and a small concurrency limit, so overload is easy to reach."""
    folder = tmp_path_factory.mktemp("faults")
    home = private_home(model_store, folder)
    done = subprocess.run([sys.executable, "-c", "from tests.e2e.test_faults import save_poison_model as s; s()"],
                          cwd=ROOT, env={**os.environ, "BENTOML_HOME": str(home)}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    config = config_with(folder, service={"max_concurrency": 8},
                         experiments={**yaml.safe_load((ROOT / "config.yaml").read_text())["experiments"],
                                      "poison": {"salt": "p", "variants": [
                                          {"name": "only", "model": POISON_TAG, "weight": 1}]}})
    server = start(folder, home, config)
    yield server
    server.stop()


def test_a_runner_that_raises_fails_only_its_batch(faults: Server) -> None:
    row = datasets.load("wine").x_test[0].tolist()
    poison = [POISON_ALCOHOL, *row[1:]]
    with httpx.Client(base_url=faults.url, timeout=30) as client:
        bad = client.post("/predict_ndarray", json={"model": "poison", "inputs": [poison]})
        assert bad.status_code == 500
        assert "Traceback" not in bad.text
        request_id = bad.headers["x-request-id"]
        good = client.post("/predict_ndarray", json={"model": "poison", "inputs": [row]})
        assert good.status_code == 200, good.text
        assert client.post("/predict", json={"instances": [{"model": "poison", "inputs": row}]}).status_code == 200
    time.sleep(0.5)
    assert request_id in faults.output(), "the failing request's id is in the server log"


async def _blast(url: str, body: dict, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=count)) as client:
        return await asyncio.gather(*(client.post("/predict_ndarray", json=body) for _ in range(count)))


def test_overload_sheds_with_503_and_retry_after_then_recovers(faults: Server) -> None:
    rows = np.tile(datasets.load("digits").x_test, (2, 1, 1))[:800].tolist()
    answers = asyncio.run(_blast(faults.url, {"model": "digits", "inputs": rows}, 120))
    statuses = Counter(r.status_code for r in answers)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[503] > 0 and statuses[200] > 0, statuses
    shed = next(r for r in answers if r.status_code == 503)
    assert shed.headers["retry-after"] == "1"
    assert "error" in shed.json()
    with httpx.Client(base_url=faults.url, timeout=30) as client:
        assert all(client.post("/predict_ndarray", json={"model": "digits", "inputs": rows[:4]}).status_code == 200
                   for _ in range(10))


async def _grpc_blast(target: str, request: oip_pb2.ModelInferRequest, count: int) -> list[grpc.StatusCode | str]:
    """``count`` concurrent ModelInfer calls: each one's code, and for a RESOURCE_EXHAUSTED its retry-after."""
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", -1)]) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)

        async def one() -> grpc.StatusCode | str:
            try:
                await stub.ModelInfer(request, timeout=60)
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    return f"retry after {dict(err.trailing_metadata() or ()).get(RETRY_AFTER)}"
                return err.code()
        return await asyncio.gather(*(one() for _ in range(count)))


def test_grpc_overload_is_resource_exhausted_with_retry_after_then_recovers(faults: Server) -> None:
    """The same overload over gRPC: RESOURCE_EXHAUSTED with the wait in its metadata, never another
    code, and small requests answered once it passes."""
    rows = np.tile(datasets.load("digits").x_test, (2, 1, 1))[:800].astype(np.float32)
    request = oip_pb2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype="FP32", shape=rows.shape)
    request.raw_input_contents.append(rows.tobytes())
    codes = Counter(asyncio.run(_grpc_blast(faults.grpc_target, request, 120)))
    # Some may be answered (as many as the queue expects to meet max_latency_ms, after the REST test's
    # calls perhaps none: an 800-row request alone is 12 calls); nothing but OK or the shed.
    assert set(codes) <= {grpc.StatusCode.OK, "retry after 1"}, codes
    assert codes["retry after 1"] > 0, codes
    small = oip_pb2.ModelInferRequest(model_name="digits")
    small.inputs.add(name="input", datatype="FP32", shape=(4, 8, 8))
    small.raw_input_contents.append(rows[:4].tobytes())
    with grpc.insecure_channel(faults.grpc_target) as channel:  # one after another, as the REST test
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        assert all(len(stub.ModelInfer(small, timeout=30).outputs) > 0 for _ in range(10))


def test_a_killed_worker_is_replaced_and_service_keeps_answering(faults: Server) -> None:
    body = {"instances": [{"model": "wine", "inputs": datasets.load("wine").x_test[0].tolist()}]}
    workers = faults.workers()
    assert len(workers) == 2
    statuses: Counter = Counter()
    with httpx.Client(base_url=faults.url, timeout=30) as client:
        deadline = time.monotonic() + 20
        killed = False
        while time.monotonic() < deadline:
            if not killed and time.monotonic() > deadline - 17:
                os.kill(workers[0].pid, signal.SIGKILL)
                killed = True
            try:
                statuses[client.post("/predict", json=body).status_code] += 1
            except httpx.TransportError:
                statuses["transport"] += 1
    assert statuses[200] > 100
    assert sum(n for s, n in statuses.items() if s != 200) <= 5, statuses
    alive = faults.workers()
    assert len(alive) == 2 and workers[0].pid not in {p.pid for p in alive}
    wait_until_loaded(faults, {p.pid for p in alive} - {workers[1].pid})


def test_when_the_workers_parent_is_killed_its_workers_stop_and_a_new_group_serves(faults: Server) -> None:
    """The parent of forked workers (``serving/prefork.py``) killed outright: its workers stop with it
    (none is left serving outside BentoML's supervision), BentoML starts a new parent, which forks new
    workers, and the service answers again."""
    workers = faults.workers()
    parent = psutil.Process(workers[0].ppid())
    parent.kill()
    gone, alive = psutil.wait_procs(workers, timeout=STOP_WITH_PARENT_S)
    assert not alive, f"workers still running after their parent was killed: {alive}"
    body = {"instances": [{"model": "wine", "inputs": datasets.load("wine").x_test[0].tolist()}]}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        new = faults.workers()
        if len(new) == 2 and not {p.pid for p in new} & {p.pid for p in workers}:
            break
        time.sleep(0.5)
    assert len(new) == 2 and new[0].ppid() != parent.pid, new
    wait_until_loaded(faults, {p.pid for p in new})
    assert httpx.post(f"{faults.url}/predict", json=body, timeout=30).status_code == 200


def wait_until_loaded(server: Server, pids: set[int], timeout_s: float = 120) -> None:
    """Until the workers ``pids`` have loaded their models and joined the repository: the next test
    measures capacity, which a replacement still importing its runtimes would halve."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        joined = {int(worker.rsplit("/", 1)[1]) for worker in httpx.get(f"{server.url}/admin/models",
                                                                        timeout=10).json()["workers"]}
        if pids <= joined:
            return
        time.sleep(0.5)
    raise AssertionError(f"workers {pids} never joined the repository")


def test_capacity_search_ramps_until_a_rate_fails_and_returns_one_that_held(faults: Server) -> None:
    """On the faults server (4 requests in flight per worker) the search must stop well below 2,000/s."""
    found, steps = soak.capacity(faults, start=50, step_s=2, p99_budget_ms=500, bisections=1)
    assert steps[0] == (50, True), steps
    ramp = [rate for rate, _ in steps[:-1]]
    assert ramp == sorted(ramp) and steps[-2][1] is False, steps
    assert found == max(rate for rate, held in steps if held) and 50 <= found < 2000, steps


def test_short_soak_loses_nothing_and_memory_stays_flat(server: ServerProcess) -> None:
    result = soak.soak(server, rate=100, seconds=20)
    assert result.sent == result.answered, result
    assert set(result.statuses) == {"200"}, result
    assert result.rss_growth < soak.MAX_RSS_GROWTH, result


def test_an_invalid_edit_while_running_keeps_the_weights_in_force(faults: Server) -> None:
    config_file = next(Path(faults.log.name).parent.glob("config.yaml"))
    good = config_file.read_text()
    before = httpx.get(f"{faults.url}/experiments").json()
    try:
        config_file.write_text(good + "\nbatching: [not, a, mapping]\n")
        time.sleep(1.0)
        assert httpx.get(f"{faults.url}/experiments").json() == before
        row = datasets.load("wine").x_test[0].tolist()
        assert httpx.post(f"{faults.url}/predict", json={"instances": [{"model": "wine", "inputs": row}]}).status_code == 200
    finally:
        config_file.write_text(good)
    assert "configuration change not applied" in faults.output()


def test_an_experiment_added_to_the_file_while_running_is_served_and_a_bad_one_refused(faults: Server) -> None:
    """The file's declarations are followed live (docs/experiments.md, "which wins"): a new experiment
    over stored models is served by every worker; one naming a model the store lacks is refused whole."""
    config_file = next(Path(faults.log.name).parent.glob("config.yaml"))
    good = config_file.read_text()
    data = yaml.safe_load(good)
    data["experiments"]["wine2"] = {**data["experiments"]["wine"], "salt": "w2"}
    data["experiments"]["wine3"] = {"salt": "w3", "variants": [{"name": "ghost", "model": "wine_ghost:v1"}]}
    row = datasets.load("wine").x_test[0].tolist()
    try:
        config_file.write_text(yaml.safe_dump(data))
        time.sleep(2.0)
        served = httpx.get(f"{faults.url}/experiments").json()["experiments"]
        assert "wine2" in served and served["wine2"]["source"] == "config" and "wine3" not in served
        for _ in range(8):  # both workers
            answer = httpx.post(f"{faults.url}/predict_ndarray", json={"model": "wine2", "inputs": [row]})
            assert answer.status_code == 200, answer.text
        refused = httpx.post(f"{faults.url}/predict_ndarray", json={"model": "wine3", "inputs": [row]})
        assert refused.status_code == 404 and refused.json()["field"] == "model", refused.text
    finally:
        config_file.write_text(good)
    assert "configuration change not applied" in faults.output()


SLOW_TIMEOUT_S = 0.15
"""A timeout that a small request meets by far and a 23-megapixel image (~0.25 s to decode) misses."""


def test_a_request_over_the_timeout_gets_504_naming_it_and_the_next_is_answered(model_store: Path,
                                                                               tmp_path: Path) -> None:
    """``service.timeout_s`` in a real server is ``protocols/timeout.py``'s deadline (its message
    names the setting; BentoML's did not): the slow request is cut with 504, the server goes on."""
    server = start(tmp_path, private_home(model_store, tmp_path),
                   config_with(tmp_path, service={"timeout_s": SLOW_TIMEOUT_S}))
    png = io.BytesIO()
    Image.new("RGB", (4800, 4800), (200, 200, 200)).save(png, format="PNG")
    row = datasets.load("wine").x_test[0].tolist()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            slow = client.post("/classify_image", files={"image": ("big.png", png.getvalue(), "image/png")})
            assert slow.status_code == 504, slow.text
            assert slow.json() == {"error": f"no answer started within service.timeout_s ({SLOW_TIMEOUT_S:g} s)"}
            for _ in range(4):
                answer = client.post("/predict", json={"instances": [{"model": "wine", "inputs": row}]})
                assert answer.status_code == 200, answer.text
    finally:
        server.stop()
