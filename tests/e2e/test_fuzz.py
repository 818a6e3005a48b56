"""Issue: reliability. Bad input gets a clear 4xx naming the field, never a 5xx or a hang, and the
server keeps serving.

Property-based tests (hypothesis) of request parsing and routing over HTTP (the same properties
as tests/unit/test_fuzz_inputs.py, in process) against the session's real ``bentoml serve``, then a check
that the server still answers right. Schemathesis over the service's OpenAPI document (``/docs.json``)
is in tests/e2e/test_openapi.py.
Every budget is bounded (``max_examples``, no example database) so the file runs in CI in well under
three minutes on two cores.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common import datasets, store
from tests.strategies import (ANY_USER, ANY_VARIANT, CONFIG, FINITE, HTTP, JSON_VALUES, LONG_TEXT, MAX_ROWS,
                              MODELS, REQUEST_TIMEOUT_S, TEXT, VARIANTS, encoded_image, image_bytes,
                              inputs_for)

# ---------------------------------------------------------------------------------------------
# Over HTTP against the session's server
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(client: httpx.Client) -> dict[str, tuple[int, ...]]:
    """Each served model's row shape, as the catalogue publishes it."""
    return {name: tuple(entry["input"]["shape"][1:]) for name, entry in client.get("/models").json().items()}


@pytest.fixture(scope="module")
def server_pids(server) -> set[int]:
    """The server's processes before the fuzzing: a worker that dies and is restarted changes them."""
    return {p.pid for p in server.processes()}


def server_traceback(server) -> str:
    output = server.output()
    start = output.rfind("Traceback")
    return output[start:start + 4000] if start >= 0 else output[-2000:]


def assert_clear_answer(server, response: httpx.Response, sent: Any) -> Any:
    """< 500 with a JSON body; a 4xx names the field (our errors) or has pydantic ``detail`` + ``loc``."""
    assert response.status_code < 500, (
        f"{response.status_code} {response.text[:500]}\nfor {str(sent)[:1500]}\n"
        f"server log:\n{server_traceback(server)}")
    try:
        body = response.json()
    except ValueError:
        raise AssertionError(f"{response.status_code} not JSON: {response.text[:300]!r}") from None
    if response.status_code >= 400:
        assert isinstance(body, dict) and isinstance(body.get("error"), str), body
        if "field" in body:
            assert isinstance(body["field"], str) and body["field"], body
        else:
            detail = body.get("detail")
            assert isinstance(detail, list) and detail and all("loc" in d for d in detail), (
                f"{response.status_code} names no field: {body}")
    return body


def _post_json(client: httpx.Client, path: str, body: Any, ascii_only: bool) -> httpx.Response:
    # json.dumps (not httpx's json=) so NaN/Infinity tokens and non-ASCII bodies go out as they are
    content = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=ascii_only).encode(
        "utf-8", "surrogatepass")
    return client.post(path, content=content, headers={"content-type": "application/json"},
                       timeout=REQUEST_TIMEOUT_S)


@st.composite
def instances(draw: st.DrawFn, shapes: dict[str, tuple[int, ...]], anything: bool = True) -> Any:
    """A ``/predict`` instance with one fault at a time in an otherwise valid instance (so each fault
    reaches the code behind the others), or none, or several, or any JSON at all."""
    fault = draw(st.sampled_from(["none", "inputs", "inputs", "model", "user_id", "variant", "extra",
                                  "missing",
                                  "several", *(["json"] if anything else [])]))
    if fault == "json":
        return draw(JSON_VALUES)
    several = fault == "several"
    model = draw(LONG_TEXT) if fault == "model" or (several and draw(st.booleans())) else draw(
        st.sampled_from(MODELS))
    shape = shapes.get(model) or draw(st.sampled_from(sorted(shapes.values())))
    inputs = draw(inputs_for(shape, 1)) if fault == "inputs" or several else draw(
        hnp.arrays(np.float32, shape, elements=FINITE)).tolist()
    instance: dict[str, Any] = {"model": model, "inputs": inputs}
    if fault == "user_id" or (several and draw(st.booleans())):
        instance["user_id"] = draw(st.one_of(ANY_USER, JSON_VALUES))
    elif draw(st.booleans()):
        instance["user_id"] = draw(st.text(min_size=1, max_size=40))
    if fault == "variant" or (several and draw(st.booleans())):
        instance["variant"] = draw(st.one_of(ANY_VARIANT, JSON_VALUES))
    elif model in CONFIG.experiments and draw(st.booleans()):
        instance["variant"] = draw(st.sampled_from([v.name for v in CONFIG.experiments[model].variants]))
    if fault == "extra" or (several and draw(st.booleans())):
        instance[draw(TEXT)] = draw(JSON_VALUES)
    if fault == "missing" or (several and draw(st.booleans())):
        del instance[draw(st.sampled_from(["model", "inputs"]))]
    return instance


@settings(HTTP)
@given(data=st.data(), ascii_only=st.booleans())
def test_http_predict_any_body_gets_a_clear_answer(server, client: httpx.Client, shapes, server_pids,
                                                   data: st.DataObject, ascii_only: bool) -> None:
    body = data.draw(st.one_of(
        st.fixed_dictionaries({"instances": st.lists(instances(shapes), max_size=4)}),
        st.fixed_dictionaries({"instances": st.lists(instances(shapes), max_size=2)},
                              optional={"extra": JSON_VALUES}),
        JSON_VALUES, st.binary(max_size=100)), label="body")
    response = _post_json(client, "/predict", body, ascii_only)
    answer = assert_clear_answer(server, response, body)
    if response.status_code == 200:
        assert isinstance(answer, list) and len(answer) == len(body["instances"])
        for instance, result in zip(body["instances"], answer):
            assert result["model"] == instance["model"]


@settings(HTTP)
@given(data=st.data(), ascii_only=st.booleans())
def test_http_predict_ndarray_any_body_gets_a_clear_answer(server, client: httpx.Client, shapes, server_pids,
                                                           data: st.DataObject, ascii_only: bool) -> None:
    if data.draw(st.integers(0, 9), label="raw") == 0:
        body: Any = data.draw(st.one_of(JSON_VALUES, st.binary(max_size=100)), label="body")
    else:
        body = data.draw(instances(shapes, anything=False), label="body")
        if "inputs" in body and body.get("model") in shapes:
            body["inputs"] = data.draw(inputs_for(shapes[body["model"]], MAX_ROWS), label="inputs")
    response = _post_json(client, "/predict_ndarray", body, ascii_only)
    answer = assert_clear_answer(server, response, body)
    if response.status_code == 200:
        rows = np.asarray(body["inputs"], dtype=np.float32)
        n = 1 if rows.shape == shapes[body["model"]] else len(rows)
        assert answer["model"] == body["model"] and len(answer["labels"]) == n
        assert response.headers["X-Variant"] == answer["variant"]


FORM_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)


@settings(HTTP, max_examples=100)
@given(data=st.data())
def test_http_classify_image_any_multipart_gets_a_clear_answer(server, client: httpx.Client, server_pids,
                                                               data: st.DataObject) -> None:
    fields: dict[str, str] = {}
    for name, values in (("model", st.one_of(st.sampled_from(MODELS), st.just("digits"), FORM_TEXT)),
                         ("user_id", FORM_TEXT),
                         ("variant", st.one_of(st.sampled_from(VARIANTS), FORM_TEXT))):
        if data.draw(st.booleans(), label=f"has {name}"):
            fields[name] = data.draw(values, label=name)
    image = data.draw(image_bytes(), label="image")
    how = data.draw(st.sampled_from(["file", "file", "file", "missing", "text_field", "raw"]), label="how")
    sent: Any = {"fields": fields, "image": image[:64], "how": how}
    if how == "raw":  # a body that claims to be multipart and may not be
        body = data.draw(st.one_of(st.binary(max_size=300), st.just(image)), label="raw body")
        ctype = data.draw(st.sampled_from(["multipart/form-data", "multipart/form-data; boundary=xYz",
                                           "multipart/form-data; boundary="]), label="content-type")
        sent = {"content-type": ctype, "body": body[:200]}
        response = client.post("/classify_image", content=body, headers={"content-type": ctype},
                               timeout=REQUEST_TIMEOUT_S)
    elif how == "text_field":  # the image as a plain form field instead of a file upload
        fields["image"] = data.draw(st.one_of(FORM_TEXT, st.just("http://127.0.0.1:1/x.png")),
                                    label="image text")
        sent["fields"] = fields
        response = client.post("/classify_image", data=fields, files={"_": ("", b"")},
                               timeout=REQUEST_TIMEOUT_S)
    else:
        files = {} if how == "missing" else {"image": (
            data.draw(st.sampled_from(["d.png", "d.jpg", "", "x"]), label="filename"), image,
            data.draw(st.sampled_from(["image/png", "image/jpeg", "application/octet-stream", "text/plain"]),
                      label="part type"))}
        response = client.post("/classify_image", data=fields, files=files or {"_": ("", b"")},
                               timeout=REQUEST_TIMEOUT_S)
    answer = assert_clear_answer(server, response, sent)
    if response.status_code == 200:
        assert answer["model"] == fields.get("model", "digits")
        assert response.headers["X-Variant"] == answer["variant"]


def _png() -> bytes:
    return encoded_image(np.zeros((8, 8), dtype=np.uint8), "PNG")


def _multipart(*parts: tuple[str, str | None, bytes]) -> bytes:
    """A multipart body by hand: (name, filename or None for a plain field, content)."""
    out = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--XyZ\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    return out + b"--XyZ--\r\n"


BIG = str(10 ** 400)
MULTIPART = "multipart/form-data; boundary=XyZ"
FOUND = {
    # a huge JSON integer: OverflowError in Schema.batch's np.asarray
    "ndarray huge int": ("/predict_ndarray", "application/json",
                         f'{{"model": "wine", "inputs": [{",".join(["1"] * 12)}, {BIG}]}}'),
    "tfserving huge int": ("/v1/models/wine:predict", "application/json",
                           f'{{"instances": [[{",".join(["1"] * 12)}, {BIG}]]}}'),
    # a shape whose element count overflows int64 to 0, with no data: reshape fails
    "oip shape overflow": ("/v2/models/digits/infer", "application/json",
                           '{"inputs": [{"name": "x", "shape": [4294967296, 4294967296], "datatype": "FP32", '
                           '"data": []}]}'),
    # an image for a model that takes feature vectors: IndexError in images.to_pixels
    "image for wine": ("/classify_image", MULTIPART,
                       _multipart(("image", "d.png", _png()), ("model", None, b"wine"))),
    # multipart that does not parse: BentoML's HTTPException(400) becomes a 500
    "multipart garbage": ("/classify_image", MULTIPART, b"--XyZ\r\nNone--XyZ--\r\n"),
    "multipart no boundary": ("/classify_image", "multipart/form-data", b"garbage"),
    "predict as multipart": ("/predict", MULTIPART, b"garbage"),
    "predict_ndarray as multipart": ("/predict_ndarray", MULTIPART, b"garbage"),
    # the image as a plain form field (or a file part without a filename): BentoML fetches it as a URL
    "image as text field": ("/classify_image", MULTIPART,
                            _multipart(("image", None, b"http://127.0.0.1:1/x.png"))),
    "image with empty filename": ("/classify_image", MULTIPART, _multipart(("image", "", _png()))),
}


@pytest.mark.parametrize("name", sorted(FOUND))
def test_found_by_fuzzing_gets_a_clear_answer(server, client: httpx.Client, server_pids, name: str) -> None:
    """What the fuzzing found, pinned: each answered < 500 with a JSON error that names the problem."""
    path, content_type, body = FOUND[name]
    response = client.post(path, content=body, headers={"content-type": content_type},
                           timeout=REQUEST_TIMEOUT_S)
    if path.startswith(("/v1/", "/v2/")):  # the protocols answer {"error": "..."} as their clients expect
        assert response.status_code < 500, (
            f"{response.status_code} {response.text[:300]}\n{server_traceback(server)}")
        assert isinstance(response.json().get("error"), str), response.text
    else:
        assert_clear_answer(server, response, body)


# ---------------------------------------------------------------------------------------------
# The server keeps serving
# ---------------------------------------------------------------------------------------------


def offline_labels(model_tag: str, family: str) -> list[str]:
    classes = datasets.load(family).classes
    return [classes[i] for i in store.stored_test_probs(store.get(model_tag)).argmax(1)]


def test_server_keeps_serving_after_the_fuzzing(server, client: httpx.Client, server_pids) -> None:
    """Runs last in this file: no worker died or was restarted, and answers are still correct."""
    assert {p.pid for p in server.processes()} == server_pids, "a server process died during the fuzzing"
    assert client.get("/readyz").status_code == 200
    for family in MODELS:
        data = datasets.load(family)
        for variant in CONFIG.experiments[family].variants:
            # the whole test split, as stored: INT8 twins quantize activations per batch
            response = client.post("/predict_ndarray", json={
                "model": family, "inputs": data.x_test.tolist(), "variant": variant.name})
            assert response.status_code == 200, response.text
            assert response.json()["labels"] == offline_labels(variant.model, family)
        rows = data.x_test[:5]
        response = client.post("/predict", json={"instances": [{"model": family, "inputs": r.tolist()}
                                                               for r in rows]})
        assert response.status_code == 200, response.text
        assert len(response.json()) == len(rows)
