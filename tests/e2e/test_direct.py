"""Issue: performance. The direct path (``service.direct_path``, ``protocols/direct.py``) answers what
BentoML's path answers: the same requests, the fuzzing's included, sent to the session's server
(direct path on, the default) and to one with it off, get equal status codes, bodies and headers.

A request without a user id or a pinned variant is A/B split at random, so its answer is resent to
the other server until it draws the same variants (the ids of an answer differ by design).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.server import ServerProcess
from tests import ROOT
from tests.e2e import test_fuzz, test_protocols
from tests.e2e.conftest import TOKENS, server_env
from tests.strategies import HTTP, JSON_VALUES, MAX_ROWS, inputs_for

pytestmark = pytest.mark.slow

IGNORED = {"date", "x-request-id", "x-prediction-id", "location", "content-length", "connection"}
"""Per request, naming the server's own port (a redirect's Location), following the prediction ids'
lengths (Content-Length: the bodies are compared without the ids), or the connection's age
(``Connection: close``, ``service.max_connection_age_s``)."""
MAX_INSTANCES = 4
"""Unpinned instances in one fuzzed body, each split between two variants at equal weights."""
MISS_P = 1e-6
REDRAWS = math.ceil(math.log(MISS_P) / math.log(1 - 2.0 ** -MAX_INSTANCES))
"""Resends for the other server to draw the variants of the first answer: with ``MAX_INSTANCES``
instances a resend matches with 1/16, so 40 (the number before) all missed 7.6% of the time, and
these 215 with ``MISS_P``."""
ROW = test_protocols.ROW


@pytest.fixture(scope="module")
def bentoml_path(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A server whose every request takes BentoML's path (``service.direct_path: false``), in a worker
    BentoML starts itself (``service.fork_workers: false``)."""
    folder = tmp_path_factory.mktemp("bentoml-path")
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["service"].update(direct_path=False, workers=1, fork_workers=False)
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))  # the models in their order
    server = ServerProcess("service:Bundle", ROOT, server_env(model_store, folder / "config.yaml", **TOKENS), folder)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client
    server.stop()


def comparable(response: httpx.Response) -> tuple[int, Any, list[tuple[str, str]]]:
    """Status, body and headers, without what differs by design between two answers."""
    try:
        body: Any = response.json()
    except ValueError:
        body = response.content

    def without_ids(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: without_ids(v) for k, v in value.items() if k not in ("prediction_id", "prediction_ids")}
        return [without_ids(v) for v in value] if isinstance(value, list) else value

    return response.status_code, without_ids(body), sorted((k, v) for k, v in response.headers.items()
                                                           if k not in IGNORED)


def assert_same_answer(client: httpx.Client, bentoml_path: httpx.Client, path: str, content: bytes,
                       headers: dict[str, str] | None = None) -> None:
    headers = headers or {"content-type": "application/json"}
    expected = comparable(client.post(path, content=content, headers=headers))
    for _ in range(REDRAWS):
        got = comparable(bentoml_path.post(path, content=content, headers=headers))
        if got == expected:
            return
    assert got == expected, f"{path} {content[:300]!r}"


def encoded(body: Any, ascii_only: bool = True) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=ascii_only).encode(
        "utf-8", "surrogatepass")


@settings(HTTP)
@given(data=st.data(), ascii_only=st.booleans())
def test_predict_any_body_gets_the_same_answer(client: httpx.Client, bentoml_path: httpx.Client, shapes,
                                               data: st.DataObject, ascii_only: bool) -> None:
    body = data.draw(st.one_of(
        st.fixed_dictionaries({"instances": st.lists(test_fuzz.instances(shapes), max_size=MAX_INSTANCES)}),
        st.fixed_dictionaries({"instances": st.lists(test_fuzz.instances(shapes), max_size=2)},
                              optional={"extra": JSON_VALUES}),
        JSON_VALUES, st.binary(max_size=100)), label="body")
    assert_same_answer(client, bentoml_path, "/predict", encoded(body, ascii_only))


@settings(HTTP)
@given(data=st.data(), ascii_only=st.booleans())
def test_predict_ndarray_any_body_gets_the_same_answer(client: httpx.Client, bentoml_path: httpx.Client, shapes,
                                                       data: st.DataObject, ascii_only: bool) -> None:
    if data.draw(st.integers(0, 9), label="raw") == 0:
        body: Any = data.draw(st.one_of(JSON_VALUES, st.binary(max_size=100)), label="body")
    else:
        body = data.draw(test_fuzz.instances(shapes, anything=False), label="body")
        if "inputs" in body and body.get("model") in shapes:
            body["inputs"] = data.draw(inputs_for(shapes[body["model"]], MAX_ROWS),
                                       label="inputs")
    assert_same_answer(client, bentoml_path, "/predict_ndarray", encoded(body, ascii_only))


NDARRAY_EDGES = [b"", b"{}", b"[]", b'{"model": "wine"}', b'{"model": "wine", "inputs": [[1, 2], [3]]}',
                 encoded({"model": "wine", "inputs": [ROW] * 1025}),
                 encoded({"model": "wine", "inputs": [ROW, ROW], "user_id": "u1", "ids": ["a", "b"]}),
                 encoded({"model": "wine", "inputs": [ROW], "ids": ["a", "b"]}),
                 encoded({"model": "wine", "inputs": [ROW], "variant": "onnx-v2"}),
                 encoded({"model": "nope", "inputs": [ROW]}),
                 b'{"model": "wine", "inputs": [[NaN' + b", 1" * 12 + b"]]}"]


@pytest.mark.parametrize("content", NDARRAY_EDGES, ids=range(len(NDARRAY_EDGES)))
def test_predict_ndarray_edges_get_the_same_answer(client: httpx.Client, bentoml_path: httpx.Client,
                                                   content: bytes) -> None:
    assert_same_answer(client, bentoml_path, "/predict_ndarray", content)


@pytest.fixture(scope="module")
def shapes(client: httpx.Client) -> dict[str, tuple[int, ...]]:
    return {name: tuple(entry["input"]["shape"][1:]) for name, entry in client.get("/models").json().items()}


EDGES = [b"", b"{}", b"null", b"\xff\xfe", b'{"instances": null}', b'{"instances": []}', b'{"instances": [' * 500,
         encoded({"instances": [{"model": "wine", "inputs": ROW}] * 1025}),
         encoded({"instances": [{"model": "wine", "inputs": ROW, "user_id": "u1"}] * 3}),
         encoded({"instances": [{"model": "wine", "inputs": ROW, "variant": "nope"}]}),
         b'{"instances": [{"model": "wine", "inputs": [NaN' + b", 1" * 12 + b"]}]}",
         b'{"instances": [{"model": "wine", "inputs": [' + b"1, " * 12 + test_fuzz.BIG.encode() + b"]}]}"]


@pytest.mark.parametrize("content", EDGES, ids=range(len(EDGES)))
def test_predict_edges_get_the_same_answer(client: httpx.Client, bentoml_path: httpx.Client, content: bytes) -> None:
    assert_same_answer(client, bentoml_path, "/predict", content)


@pytest.mark.parametrize("media", ["text/plain", "application/json; charset=utf-8", "APPLICATION/JSON", ""])
def test_predict_content_types_get_the_same_answer(client: httpx.Client, bentoml_path: httpx.Client, media: str) -> None:
    assert_same_answer(client, bentoml_path, "/predict", encoded({"instances": [{"model": "wine", "inputs": ROW}]}),
                       {"content-type": media})


PROTOCOL_CASES = [
    (case[0], encoded(case[1]), case[2] if len(case) == 5 and case[2] else None)
    for test in (test_protocols.test_oip_errors_in_the_spec_shape, test_protocols.test_tfserving_errors_in_its_shape)
    for case in (getattr(p, "values", p) for p in test.pytestmark[0].args[1])
] + [(path, body.encode(), {"content-type": media}) for path, media, body in test_fuzz.FOUND.values()
     if path.startswith(("/v1/", "/v2/"))] + [
    (test_protocols.INFER, test_protocols.BINARY, test_protocols.BINARY_HEADERS),
    ("/v2/models/wine/versions/onnx-v2/infer", encoded({"inputs": [test_protocols.GOOD]}), None),
    ("/v1/models/wine:predict", encoded({"signature_name": "predict", "instances": [ROW, ROW]}), None),
    ("/v1/models/wine/versions/sklearn-v1:predict", encoded({"inputs": [ROW]}), None)]


@pytest.mark.parametrize(("path", "content", "headers"), PROTOCOL_CASES, ids=range(len(PROTOCOL_CASES)))
def test_protocols_get_the_same_answer(client: httpx.Client, bentoml_path: httpx.Client, path: str, content: bytes,
                                       headers: dict[str, str] | None) -> None:
    assert_same_answer(client, bentoml_path, path, content, headers)
