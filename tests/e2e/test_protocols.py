"""Issue: Open Inference Protocol v2 and TF Serving REST, by real HTTP against ``bentoml serve``.

Spec conformance of every route (health, metadata, inference, the binary tensor extension, errors
in each protocol's own shape) and equivalence: the same rows through ``/predict``, OIP and TF Serving
give the same labels and probabilities.
"""

from __future__ import annotations

import json
import struct

import httpx
import numpy as np
import pytest

from common import config, datasets, store

CONFIG = config.load()
FAMILIES = sorted(CONFIG.experiments)
VARIANTS = [(family, v) for family in FAMILIES for v in CONFIG.experiments[family].variants]
WINE = datasets.load("wine").x_test
ROW = WINE[0].tolist()
INFER = "/v2/models/wine/infer"
HEADER_LENGTH = "Inference-Header-Content-Length"


def tensor(rows: np.ndarray, datatype: str = "FP32", name: str = "input") -> dict:
    return {"name": name, "shape": list(rows.shape), "datatype": datatype, "data": rows.ravel().tolist()}


def oip_infer(client: httpx.Client, model: str, rows: np.ndarray, version: str | None = None, **body) -> dict:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    response = client.post(path, json={"inputs": [tensor(rows)], **body})
    assert response.status_code == 200, response.text
    assert response.headers["X-Variant"] == response.json()["parameters"]["variant"]
    return response.json()


def outputs(answer: dict) -> dict[str, dict]:
    return {o["name"]: o for o in answer["outputs"]}


def tf_predict(client: httpx.Client, model: str, body: dict, version: str | None = None) -> httpx.Response:
    path = f"/v1/models/{model}" + (f"/versions/{version}" if version else "") + ":predict"
    return client.post(path, json=body)


def assert_error(response: httpx.Response, status: int, mentions: str) -> None:
    """Both protocols answer errors as ``{"error": "..."}`` alone, never FastAPI's 422 shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and mentions in body["error"], body


# Open Inference Protocol v2: health and metadata


def test_oip_health_and_server_metadata(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    server = client.get("/v2").json()
    assert server["name"] == "bentoml-bundle" and server["version"]
    assert "binary_tensor_data" in server["extensions"]


@pytest.mark.parametrize("family", FAMILIES)
def test_oip_model_metadata_lists_variants_as_versions(client: httpx.Client, family: str) -> None:
    data, variants = datasets.load(family), CONFIG.experiments[family].variants
    metadata = client.get(f"/v2/models/{family}").json()
    assert metadata["name"] == family
    assert metadata["versions"] == [v.name for v in variants]
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, *data.input_shape]}]
    assert metadata["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(data.classes)]},
        {"name": "label", "datatype": "BYTES", "shape": [-1]}]
    for variant in variants:
        runtime = store.get(variant.model).info.labels["runtime"]
        assert runtime in metadata["platform"].split("+")
        tag_version = variant.model.split(":")[1]
        for version in (variant.name, tag_version, tag_version.removeprefix("v")):
            pinned = client.get(f"/v2/models/{family}/versions/{version}")
            assert pinned.status_code == 200, pinned.text
            assert (pinned.json()["versions"], pinned.json()["platform"]) == ([variant.name], runtime)
            assert client.get(f"/v2/models/{family}/versions/{version}/ready").json() == {
                "name": family, "ready": True}
    assert client.get(f"/v2/models/{family}/ready").json() == {"name": family, "ready": True}


@pytest.mark.parametrize("path", ["/v2/models/nope", "/v2/models/nope/ready", "/v2/models/wine/versions/v9",
                                  "/v2/models/wine/versions/v9/ready", "/v2/models/wine/versions/onnx-v9"])
def test_oip_unknown_model_or_version_is_404(client: httpx.Client, path: str) -> None:
    assert_error(client.get(path), 404, "unknown")


# Open Inference Protocol v2: inference


def test_oip_infer_answers_in_the_spec_shape(client: httpx.Client) -> None:
    rows = WINE[:5]
    response = client.post("/v2/models/wine/versions/sklearn-v1/infer", json={
        "id": "req-42", "inputs": [tensor(rows, "FP64", name="features")]})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model_name"] == "wine" and answer["model_version"] == "sklearn-v1"
    assert answer["id"] == "req-42"
    ids = answer["parameters"].pop("prediction_ids")
    assert answer["parameters"] == {"variant": "sklearn-v1", "model_tag": "wine_sklearn:v1", "pinned": True}
    assert len(set(ids)) == 5 and "X-Prediction-Id" not in response.headers  # five answers: ids in the body
    assert response.headers["X-Variant"] == "sklearn-v1"
    probabilities, label = outputs(answer)["probabilities"], outputs(answer)["label"]
    assert (probabilities["datatype"], probabilities["shape"]) == ("FP32", [5, 3])
    assert (label["datatype"], label["shape"]) == ("BYTES", [5])
    matrix = np.asarray(probabilities["data"]).reshape(5, 3)
    classes = datasets.load("wine").classes
    assert label["data"] == [classes[i] for i in matrix.argmax(1)]
    np.testing.assert_allclose(matrix.sum(1), 1, atol=1e-5)


def test_oip_accepts_nested_data_and_integer_datatypes(client: httpx.Client) -> None:
    digits = datasets.load("digits").x_test[:4]
    flat = oip_infer(client, "digits", digits, "torch-v1")
    nested = client.post("/v2/models/digits/versions/torch-v1/infer", json={"inputs": [
        {"name": "input", "shape": [4, 8, 8], "datatype": "INT64", "data": digits.astype(int).tolist()}]})
    assert nested.status_code == 200, nested.text
    # digits pixels are whole numbers, so INT64 carries them exactly
    assert outputs(nested.json())["probabilities"] == outputs(flat)["probabilities"]


def test_oip_requested_outputs_are_honoured_in_order(client: httpx.Client) -> None:
    one = oip_infer(client, "wine", WINE[:2], "onnx-v2", outputs=[{"name": "label"}])
    assert [o["name"] for o in one["outputs"]] == ["label"]
    both = oip_infer(client, "wine", WINE[:2], "onnx-v2",
                     outputs=[{"name": "label"}, {"name": "probabilities"}])
    assert [o["name"] for o in both["outputs"]] == ["label", "probabilities"]


def test_oip_unversioned_infer_is_ab_routed_and_sticky_by_user_id(client: httpx.Client) -> None:
    seen = set()
    for i in range(20):
        user = f"oip-user-{i}"
        answers = [oip_infer(client, "wine", WINE[:1], parameters={"user_id": user}) for _ in range(2)]
        native = client.post("/predict_ndarray", json={"model": "wine", "inputs": [ROW], "user_id": user})
        variants = {a["model_version"] for a in answers} | {native.json()["variant"]}
        assert len(variants) == 1, f"{user} moved between variants: {variants}"
        assert answers[0]["parameters"]["pinned"] is False
        seen |= variants
    assert seen == {v.name for v in CONFIG.experiments["wine"].variants}


def binary_request(rows: np.ndarray, datatype: str, **parameters) -> tuple[bytes, dict[str, str]]:
    """A request as Triton's client sends it: JSON, then the raw little-endian tensor bytes, the JSON's
    length in a header, and no Content-Type at all."""
    raw = rows.astype(rows.dtype.newbyteorder("<")).tobytes()
    header = json.dumps({"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": datatype,
                                     "parameters": {"binary_data_size": len(raw)}}], **parameters}).encode()
    return header + raw, {HEADER_LENGTH: str(len(header))}


def binary_outputs(response: httpx.Response) -> dict[str, np.ndarray | list]:
    """A Triton client's reading of a response: JSON header, then each binary output in order."""
    length = int(response.headers.get(HEADER_LENGTH, len(response.content)))
    header, offset, out = json.loads(response.content[:length]), length, {}
    for output in header["outputs"]:
        if "data" in output:
            out[output["name"]] = output["data"]
            continue
        raw = response.content[offset:offset + output["parameters"]["binary_data_size"]]
        offset += len(raw)
        if output["datatype"] == "BYTES":
            items, at = [], 0
            while at < len(raw):
                (size,), at = struct.unpack_from("<I", raw, at), at + 4
                items.append(raw[at:at + size].decode())
                at += size
            out[output["name"]] = items
        else:
            out[output["name"]] = np.frombuffer(raw, "<f4").reshape(output["shape"]).ravel().tolist()
    assert offset == len(response.content)
    return out


def test_oip_binary_tensor_extension_both_ways(client: httpx.Client) -> None:
    rows = datasets.load("digits").x_test[:6]
    expected = outputs(oip_infer(client, "digits", rows, "torch-v1"))
    path = "/v2/models/digits/versions/torch-v1/infer"
    for datatype, array in (("FP32", rows.astype(np.float32)), ("FP64", rows.astype(np.float64)),
                            ("UINT8", rows.astype(np.uint8))):
        body, headers = binary_request(array, datatype, parameters={"binary_data_output": True})
        response = client.post(path, content=body, headers=headers)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/octet-stream"
        got = binary_outputs(response)
        assert got["label"] == expected["label"]["data"]
        assert got["probabilities"] == pytest.approx(expected["probabilities"]["data"], abs=1e-7)
    body, headers = binary_request(rows, "FP32", outputs=[
        {"name": "probabilities", "parameters": {"binary_data": True}}, {"name": "label"}])
    mixed = client.post(path, content=body, headers=headers)
    assert mixed.status_code == 200, mixed.text
    assert binary_outputs(mixed)["label"] == expected["label"]["data"]


def send(client: httpx.Client, path: str, body: dict | bytes, headers: dict | None = None) -> httpx.Response:
    """Raw bytes as they are (broken JSON, binary bodies) with the given headers, anything else as JSON."""
    if isinstance(body, bytes):
        return client.post(path, content=body, headers=headers or {"content-type": "application/json"})
    return client.post(path, json=body)


GOOD = {"name": "input", "shape": [1, 13], "datatype": "FP32", "data": ROW}
BINARY, BINARY_HEADERS = binary_request(WINE[:1], "FP32")


@pytest.mark.parametrize(("path", "body", "headers", "status", "mentions"), [
    (INFER, b"{not json", {}, 400, "Invalid JSON"),
    (INFER, {}, {}, 400, "inputs"),
    (INFER, {"inputs": []}, {}, 400, "inputs"),
    (INFER, {"inputs": [{**GOOD, "datatype": "BYTES", "data": ["a"] * 13}]}, {}, 400, "BYTES"),
    (INFER, {"inputs": [{**GOOD, "datatype": "FP8"}]}, {}, 400, "FP8"),
    (INFER, {"inputs": [{**GOOD, "shape": [2, 13]}]}, {}, 400, "13 values for shape [2, 13]"),
    (INFER, {"inputs": [{**GOOD, "shape": [1, 12], "data": ROW[:12]}]}, {}, 400,
     "wine expects 13 features per row (shape (N, 13) or (13,)); got shape (1, 12)"),
    (INFER, {"inputs": [{**GOOD, "shape": [-1, 13]}]}, {}, 400, "shape"),
    (INFER, {"inputs": [{**GOOD, "data": ["x"] * 13}]}, {}, 400, "not FP32"),
    (INFER, {"inputs": [{**GOOD, "datatype": "INT32"}]}, {}, 400, "not INT32"),
    (INFER, {"inputs": [{**GOOD, "data": [ROW[:6], ROW[6:]]}]}, {}, 400, "ragged"),
    (INFER, {"inputs": [{**GOOD, "data": None}]}, {}, 400, "missing"),
    (INFER, {"inputs": [{**GOOD, "name": "a"}, {**GOOD, "name": "b"}]}, {}, 400, "2 input"),
    (INFER, {"inputs": [GOOD], "outputs": [{"name": "logits"}]}, {}, 400, "outputs.0.name"),
    (INFER, {"inputs": [GOOD], "parameters": {"user_id": 7}}, {}, 400, "user_id"),
    (INFER, {"inputs": [{**GOOD, "shape": [1025, 13], "data": ROW * 1025}]}, {}, 413, "1025"),
    (INFER, BINARY, {**BINARY_HEADERS, HEADER_LENGTH: "99999"}, 400, HEADER_LENGTH),
    (INFER, BINARY[:-4], BINARY_HEADERS, 400, "binary"),
    ("/v2/models/nope/infer", {"inputs": [GOOD]}, {}, 404, "nope"),
    ("/v2/models/wine/versions/v7/infer", {"inputs": [GOOD]}, {}, 404, "v7"),
])
def test_oip_errors_in_the_spec_shape(client: httpx.Client, path: str, body: dict | bytes, headers: dict,
                                      status: int, mentions: str) -> None:
    assert_error(send(client, path, body, headers), status, mentions)


# TF Serving REST


@pytest.mark.parametrize("family", FAMILIES)
def test_tfserving_model_status(client: httpx.Client, family: str) -> None:
    variants = CONFIG.experiments[family].variants
    ok = {"state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    assert client.get(f"/v1/models/{family}").json() == {
        "model_version_status": [{"version": v.name, **ok} for v in variants]}
    last = variants[-1]
    assert client.get(f"/v1/models/{family}/versions/{last.model.split(':')[1]}").json() == {
        "model_version_status": [{"version": last.name, **ok}]}


@pytest.mark.parametrize("path", ["/v1/models/nope", "/v1/models/wine/versions/3"])
def test_tfserving_status_of_unknown_model_or_version_is_404(client: httpx.Client, path: str) -> None:
    assert_error(client.get(path), 404, "unknown")


def test_tfserving_row_and_columnar_formats(client: httpx.Client) -> None:
    digits = datasets.load("digits")
    rows = digits.x_test[:3].tolist()  # each row an 8x8 nested list
    expected = outputs(oip_infer(client, "digits", digits.x_test[:3], "torch-v1"))
    probabilities = np.asarray(expected["probabilities"]["data"]).reshape(3, 10).tolist()
    for body, key in (({"instances": rows}, "predictions"),
                      ({"instances": [{"pixels": r} for r in rows]}, "predictions"),
                      ({"inputs": rows}, "outputs"),
                      ({"inputs": {"pixels": rows}, "signature_name": "serving_default"}, "outputs")):
        response = tf_predict(client, "digits", body, "torch-v1")
        assert response.status_code == 200, response.text
        assert {k: v for k, v in response.json().items() if k != "prediction_ids"} == {key: probabilities}
        assert len(response.json()["prediction_ids"]) == 3
        assert response.headers["X-Variant"] == "torch-v1"
    labels = expected["label"]["data"]
    rows_form = tf_predict(client, "digits", {"signature_name": "predict", "instances": rows}, "v1").json()
    del rows_form["prediction_ids"]
    assert rows_form == {"predictions": [{"probabilities": p, "label": label}
                                         for p, label in zip(probabilities, labels)]}
    columns = tf_predict(client, "digits", {"signature_name": "predict", "inputs": rows}, "1").json()
    del columns["prediction_ids"]
    assert columns == {"outputs": {"probabilities": probabilities, "label": labels}}


def test_tfserving_takes_the_body_whatever_its_content_type(client: httpx.Client) -> None:
    """TF Serving ignores Content-Type, and its documented examples are ``curl -d``, which says
    ``application/x-www-form-urlencoded``."""
    body = json.dumps({"instances": [ROW]}).encode()
    expected = tf_predict(client, "wine", {"instances": [ROW]}, "sklearn-v1").json()["predictions"]
    for content_type in ("application/x-www-form-urlencoded", "text/plain"):
        response = client.post("/v1/models/wine/versions/sklearn-v1:predict", content=body,
                               headers={"content-type": content_type})
        assert response.status_code == 200, response.text
        assert response.json()["predictions"] == expected


def test_tfserving_unversioned_predict_is_ab_routed(client: httpx.Client) -> None:
    seen = set()
    for _ in range(30):
        response = tf_predict(client, "cancer", {"instances": datasets.load("cancer").x_test[:1].tolist()})
        assert response.status_code == 200, response.text
        seen.add(response.headers["X-Variant"])
    assert seen == {v.name for v in CONFIG.experiments["cancer"].variants}


@pytest.mark.parametrize(("path", "body", "status", "mentions"), [
    ("/v1/models/wine:predict", {"instances": [ROW[:12]]}, 400, "wine expects 13 features per row (shape (N, 13))"),
    ("/v1/models/wine:predict", {"instances": ROW}, 400, "one row alone is sent as a batch of one"),
    ("/v1/models/wine:predict", {"instances": [ROW], "inputs": [ROW]}, 400, "exactly one"),
    ("/v1/models/wine:predict", {}, 400, "exactly one"),
    ("/v1/models/wine:predict", b"{not json", 400, "Invalid JSON"),
    ("/v1/models/wine:predict", {"inputs": 5}, 400, "list of rows"),
    ("/v1/models/wine:predict", {"inputs": {"a": [ROW], "b": [1]}}, 400, "2 named inputs"),
    ("/v1/models/wine:predict", {"instances": [["x"] * 13]}, 400, "numeric"),
    ("/v1/models/wine:predict", b'{"instances": [[NaN, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]}', 400, "NaN"),
    ("/v1/models/wine:predict", {"signature_name": "classify", "instances": [ROW]}, 400, "signature_name"),
    ("/v1/models/wine:predict", {"instances": [ROW] * 1025}, 413, "1025"),
    ("/v1/models/nope:predict", {"instances": [ROW]}, 404, "nope"),
    ("/v1/models/wine/versions/onnx-v7:predict", {"instances": [ROW]}, 404, "onnx-v7"),
])
def test_tfserving_errors_in_its_shape(client: httpx.Client, path: str, body: dict | bytes, status: int,
                                       mentions: str) -> None:
    assert_error(send(client, path, body), status, mentions)


# The same rows through every protocol


@pytest.mark.parametrize(("family", "variant"), VARIANTS, ids=[f"{f}-{v.name}" for f, v in VARIANTS])
def test_predict_oip_and_tfserving_agree(client: httpx.Client, family: str, variant: config.Variant) -> None:
    rows = datasets.load(family).x_test[:40]
    native = client.post("/predict", json={"instances": [
        {"model": family, "inputs": r.tolist(), "variant": variant.name} for r in rows]})
    assert native.status_code == 200, native.text
    oip = outputs(oip_infer(client, family, rows, variant.name))
    tf = tf_predict(client, family, {"signature_name": "predict", "instances": rows.tolist()}, variant.name)
    assert tf.status_code == 200, tf.text
    answers = {
        "oip": (oip["label"]["data"], np.reshape(oip["probabilities"]["data"], (len(rows), -1))),
        "tfserving": ([p["label"] for p in tf.json()["predictions"]],
                      [p["probabilities"] for p in tf.json()["predictions"]]),
    }
    # Dynamic INT8 quantizes activations with a scale taken over the whole batch, so probabilities may
    # move a little with the batch a row shares; labels must not.
    atol = 1e-6 if store.get(variant.model).info.labels["precision"] == "fp32" else 0.05
    for protocol, (labels, probabilities) in answers.items():
        assert labels == [a["label"] for a in native.json()], protocol
        np.testing.assert_allclose(probabilities, [a["probabilities"] for a in native.json()], atol=atol,
                                   err_msg=protocol)
