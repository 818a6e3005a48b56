"""Issue 19.5: API keys and rate limits, against a real server with 2 workers and its own config.yaml.

A missing or wrong key gets 401 on every inference route and only there; a burst over a key's limit
gets 429 with ``Retry-After`` from a bucket both workers share; a key under its limit never does; a
keyed prediction is logged with its key's name; a key removed from config.yaml is refused by both
workers, and on new connections, within a second of the file's write; without keys the limit applies
per client address; and keys off (the default) change nothing. The keyed server's tests run in file
order: the last ones edit its configuration.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import yaml
from prometheus_client.parser import text_string_to_metric_families

from common import datasets
from experiments.store import PREDICTIONS
from tests.e2e.conftest import ROOT, Server, server_env

pytestmark = pytest.mark.slow  # servers, databases or builds of its own

ROW = datasets.load("wine").x_test[0].tolist()
PREDICT = ("/predict", {"instances": [{"model": "wine", "inputs": ROW}]})
INFERENCE = [
    PREDICT,
    ("/predict_ndarray", {"model": "wine", "inputs": [ROW]}),
    ("/v2/models/wine/infer", {"inputs": [{"name": "input", "shape": [1, len(ROW)], "datatype": "FP32",
                                           "data": ROW}]}),
    ("/v2/models/wine/versions/v2/infer", {"inputs": [{"name": "input", "shape": [1, len(ROW)],
                                                       "datatype": "FP32", "data": ROW}]}),
    ("/v1/models/wine:predict", {"instances": [ROW]}),
    ("/v1/models/wine/versions/2:predict", {"instances": [ROW]}),
]
KEYS = {"bursty": "bursty-secret-1", "steady": "steady-secret-2", "doomed": "doomed-secret-3"}
BURST = 5
"""The bursty key's bucket: 5 at once, then one every 12 minutes (nothing refills during the test)."""
STEADY_REQUESTS = 60
ACCESS = {
    "require_keys": True,
    "keys": [
        {"name": "bursty", "sha256": hashlib.sha256(KEYS["bursty"].encode()).hexdigest(),
         "rate_limit": {"requests": BURST, "per_s": 3600}},
        {"name": "steady", "sha256": hashlib.sha256(KEYS["steady"].encode()).hexdigest()},
        {"name": "doomed", "sha256": hashlib.sha256(KEYS["doomed"].encode()).hexdigest()},
    ],
    "rate_limit": {"requests": 1000, "per_s": 1},  # the default: steady and doomed never come near it
}
WORKERS = 2
CONNECTIONS_TRIED = 64
REVOKED_WITHIN_S = 1.0
"""From the file's write to the last worker's first 401: the config poll (experiments/live.py,
FILE_POLL_S = 0.2 s) and the requests on a loaded machine fit in it (measured: docs/security.md)."""
POLL_S = 0.05
LOGGED_WITHIN_S = 10
"""The prediction log is written off the request path, in batches (store.flush_ms)."""
APPLY_DEADLINE_S = 10


def key(name: str) -> dict[str, str]:
    return {"X-API-Key": KEYS[name]}


def write_config(path: Path, access: dict) -> None:
    """config.yaml with ``access``, replaced atomically as an operator's editor or deploy tool would."""
    data = yaml.safe_load((ROOT / "config.yaml").read_text())
    data["access"] = access
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(yaml.safe_dump(data))
    os.replace(temporary, path)


@pytest.fixture(scope="module")
def keyed(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("access")
    write_config(folder / "config.yaml", ACCESS)
    server = Server("service:Bundle", ROOT, server_env(model_store, folder / "config.yaml"), folder)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def per_worker(keyed: Server) -> Iterator[list[httpx.Client]]:
    """One kept-alive connection to each worker, told apart by the per-worker prefix of X-Request-Id."""
    found: dict[str, httpx.Client] = {}
    for _ in range(CONNECTIONS_TRIED):
        connection = httpx.Client(base_url=keyed.url, timeout=60)
        answer = connection.post(PREDICT[0], json=PREDICT[1], headers=key("steady"))
        assert answer.status_code == 200, answer.text
        worker = answer.headers["X-Request-Id"].rsplit("-", 1)[0]
        if worker in found:
            connection.close()
        else:
            found[worker] = connection
        if len(found) == WORKERS:
            break
    assert len(found) == WORKERS, f"every connection went to the same worker ({CONNECTIONS_TRIED} tried)"
    yield list(found.values())
    for connection in found.values():
        connection.close()


def api_requests(server: Server) -> dict[tuple[str, str], float]:
    """``bundle_api_requests_total`` by (key, outcome), summed over the workers."""
    totals: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text):
        for sample in family.samples:
            if sample.name == "bundle_api_requests_total":
                where = (sample.labels["key"], sample.labels["outcome"])
                totals[where] = totals.get(where, 0) + sample.value
    return totals


def test_inference_without_a_valid_key_gets_401_before_the_body_is_read(keyed: Server) -> None:
    with httpx.Client(base_url=keyed.url, timeout=60) as client:
        for path, body in INFERENCE:
            for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
                answer = client.post(path, json=body, headers=headers)
                assert answer.status_code == 401, (path, headers, answer.text)
                assert answer.headers["WWW-Authenticate"] == "Bearer"
                assert "X-API-Key: <key>" in answer.json()["expected"]
            # a hostile body never reaches a parser: the key is checked first
            hostile = client.post(path, content=b"\xff{not json", headers={"Content-Type": "text/plain"})
            assert hostile.status_code == 401, (path, hostile.text)
        image = client.post("/classify_image", files={"image": ("d.png", b"not a png", "image/png")})
        assert image.status_code == 401, image.text


def test_probes_metrics_and_control_routes_need_no_api_key(keyed: Server) -> None:
    with httpx.Client(base_url=keyed.url, timeout=60) as client:
        for path in ("/readyz", "/livez", "/metrics", "/v2/health/ready", "/v2/models/wine",
                     "/v1/models/wine", "/models", "/experiments"):
            assert client.get(path).status_code == 200, path


def test_either_header_carries_a_key_on_every_protocol(keyed: Server) -> None:
    with httpx.Client(base_url=keyed.url, timeout=60) as client:
        for path, body in INFERENCE:
            for headers in (key("steady"), {"Authorization": f"Bearer {KEYS['steady']}"}):
                answer = client.post(path, json=body, headers=headers)
                assert answer.status_code == 200, (path, headers, answer.text)


def test_a_keyed_prediction_is_logged_with_the_key_name(keyed: Server) -> None:
    answer = httpx.post(f"{keyed.url}{PREDICT[0]}", json=PREDICT[1], headers=key("steady"), timeout=60)
    assert answer.status_code == 200, answer.text
    [prediction] = answer.json()
    store = Path(keyed.log.name).parent / "bentoml_home" / "experiments.sqlite"
    engine = sa.create_engine(f"sqlite:///{store}")
    query = sa.select(PREDICTIONS.c.api_key).where(PREDICTIONS.c.prediction_id == prediction["prediction_id"])
    deadline = time.monotonic() + LOGGED_WITHIN_S
    try:
        while (logged := engine.connect().execute(query).scalar_one_or_none()) is None:
            assert time.monotonic() < deadline, "the prediction was never logged"
            time.sleep(POLL_S)
    finally:
        engine.dispose()
    assert logged == "steady"


def test_a_burst_over_the_limit_gets_429_with_retry_after_from_a_bucket_both_workers_share(
        keyed: Server, per_worker: list[httpx.Client]) -> None:
    answers = [connection.post(PREDICT[0], json=PREDICT[1], headers=key("bursty"))
               for _ in range(BURST * 2) for connection in per_worker]
    admitted = [a for a in answers if a.status_code == 200]
    limited = [a for a in answers if a.status_code == 429]
    assert len(admitted) == BURST and len(limited) == len(answers) - BURST  # not BURST per worker
    for answer in limited:
        body = answer.json()
        wait_s = int(answer.headers["Retry-After"])
        assert 1 <= wait_s <= 3600 // BURST and body["retry_after_s"] == wait_s
        assert body["field"] == "X-API-Key" and "bursty" in body["error"]
        assert body["expected"] == f"at most {BURST} requests per 3600 s, {BURST} at once"
    counted = api_requests(keyed)
    assert counted[("bursty", "admitted")] == BURST
    assert counted[("bursty", "rate_limited")] == len(limited)


def test_a_key_under_its_limit_never_gets_429(per_worker: list[httpx.Client]) -> None:
    statuses = {connection.post(PREDICT[0], json=PREDICT[1], headers=key("steady")).status_code
                for _ in range(STEADY_REQUESTS // WORKERS) for connection in per_worker}
    assert statuses == {200}


def test_a_key_removed_from_the_configuration_is_refused_by_every_worker_within_a_second(
        keyed: Server, per_worker: list[httpx.Client]) -> None:
    for connection in per_worker:
        assert connection.post(PREDICT[0], json=PREDICT[1], headers=key("doomed")).status_code == 200
    config_file = Path(keyed.log.name).parent / "config.yaml"
    revoked_at = time.monotonic()  # before the write: the time measured includes it
    write_config(config_file, {**ACCESS, "keys": [k for k in ACCESS["keys"] if k["name"] != "doomed"]})
    refused_after: dict[int, float] = {}
    while len(refused_after) < len(per_worker):
        assert time.monotonic() - revoked_at < APPLY_DEADLINE_S, "the revoked key is still accepted"
        for index, connection in enumerate(per_worker):
            if index not in refused_after:
                answer = connection.post(PREDICT[0], json=PREDICT[1], headers=key("doomed"))
                if answer.status_code == 401:
                    assert "revoked" in answer.json()["error"]
                    refused_after[index] = time.monotonic() - revoked_at
        time.sleep(POLL_S)
    assert max(refused_after.values()) <= REVOKED_WITHIN_S, refused_after
    for _ in range(CONNECTIONS_TRIED // 4):  # new connections, spread over the workers, are refused too
        fresh = httpx.post(f"{keyed.url}{PREDICT[0]}", json=PREDICT[1], headers=key("doomed"), timeout=60)
        assert fresh.status_code == 401, fresh.text
    for connection in per_worker:
        assert connection.post(PREDICT[0], json=PREDICT[1], headers=key("steady")).status_code == 200


def test_without_keys_the_limit_applies_per_client_address_across_workers(
        keyed: Server, per_worker: list[httpx.Client]) -> None:
    """Runs last on the keyed server: keys off, three requests at once per address, applied live."""
    config_file = Path(keyed.log.name).parent / "config.yaml"
    write_config(config_file, {"rate_limit": {"requests": 3, "per_s": 3600}})
    answers: list[httpx.Response] = []
    deadline = time.monotonic() + APPLY_DEADLINE_S
    for connection in per_worker:  # until each worker has applied the edit
        while True:
            assert time.monotonic() < deadline, "keys are still required"
            answers.append(connection.post(PREDICT[0], json=PREDICT[1]))
            if answers[-1].status_code != 401:
                break
            time.sleep(POLL_S)
    answers += [connection.post(PREDICT[0], json=PREDICT[1]) for _ in range(3) for connection in per_worker]
    statuses = [a.status_code for a in answers if a.status_code != 401]
    assert statuses.count(200) == 3 and set(statuses) == {200, 429}, statuses
    limited = next(a for a in answers if a.status_code == 429)
    assert limited.json()["field"] == "client" and int(limited.headers["Retry-After"]) >= 1


def test_keys_and_limits_off_by_default_change_nothing(server: Server, client: httpx.Client) -> None:
    """The default configuration: no key needed, no limit met, nothing counted."""
    for path, body in INFERENCE:
        assert client.post(path, json=body).status_code == 200, path
    assert not api_requests(server)
