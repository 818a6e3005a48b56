"""Issue: layout. Each wire format's decode and encode in process, and the one place HTTP errors
become responses: what a client sends turns into the array the data plane takes, what it answers
turns into the protocol's shape, and every fault into a 4xx that names its field.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from bentoml.exceptions import ServiceUnavailable
from pydantic import ValidationError

from common.config import Config
from common.errors import ForbiddenError, NotFoundError, OverloadedError, RequestError, UnauthorizedError
from common.schema import Schema
from protocols import native, oip, rest, tfserving
from protocols.guard import Paths
from protocols.rest import error_response
from serving.types import BatchPrediction

ROW = [13.2, 1.78, 2.14, 11.2, 100.0, 2.65, 2.76, 0.26, 1.28, 4.38, 1.05, 3.4, 1050.0]
ANSWER = BatchPrediction(prediction_ids=["a1", "a2"], model="wine", variant="onnx-v2", model_tag="wine_sklearn_onnx:v2", pinned=False,
                         labels=["class_0", "class_2"], probabilities=[[0.75, 0.25, 0.0], [0.0, 0.5, 0.5]])


def body(document: dict) -> bytes:
    return json.dumps(document).encode()


def tensor(data: object, shape: list[int], datatype: str = "FP32", **extra: object) -> dict:
    return {"name": "input", "shape": shape, "datatype": datatype, "data": data, **extra}


# --- Open Inference Protocol --------------------------------------------------------------------

def test_oip_decodes_flat_and_nested_json_data_to_the_declared_shape() -> None:
    for data in (ROW, [ROW]):
        request, array, field = oip.decode(body({"inputs": [tensor(data, [1, 13])]}), None)
        assert array.shape == (1, 13) and array.tolist() == [ROW]
        assert field == "inputs.0 (input)" and request.parameters.user_id is None


def test_oip_decodes_the_binary_extension() -> None:
    values = np.asarray([ROW, ROW], np.float32)
    header = body({"inputs": [{"name": "input", "shape": [2, 13], "datatype": "FP32",
                               "parameters": {"binary_data_size": values.nbytes}}],
                   "parameters": {"user_id": "alice"}})
    request, array, _ = oip.decode(header + values.tobytes(), str(len(header)))
    np.testing.assert_array_equal(array, values)
    assert request.parameters.user_id == "alice"


@pytest.mark.parametrize(("document", "header_length", "field"), [
    ({"inputs": [tensor(ROW, [1, 13], "STRING")]}, None, "inputs.0 (input).datatype"),
    ({"inputs": [tensor(ROW, [1, 12])]}, None, "inputs.0 (input).data"),
    ({"inputs": [tensor([True] * 13, [1, 13])]}, None, "inputs.0 (input).data"),
    ({"inputs": [tensor(ROW, [1, 13]), tensor(ROW, [1, 13])]}, None, "inputs"),
    ({"inputs": []}, None, "body"),
    ({"inputs": [tensor(ROW, [1, 13])]}, "999999", "Inference-Header-Content-Length"),
])
def test_oip_decode_errors_name_the_field(document: dict, header_length: str | None, field: str) -> None:
    with pytest.raises(RequestError) as raised:
        oip.decode(body(document), header_length)
    assert raised.value.field == field and raised.value.status == 400


def test_oip_encodes_json_outputs_and_binary_when_asked() -> None:
    request, _, _ = oip.decode(body({"id": "7", "inputs": [tensor(ROW, [1, 13])]}), None)
    document = json.loads(oip.encode(ANSWER, request).body)
    assert (document["id"], document["model_name"], document["model_version"]) == ("7", "wine", "onnx-v2")
    outputs = {o["name"]: o for o in document["outputs"]}
    assert outputs["probabilities"]["shape"] == [2, 3] and outputs["label"]["data"] == ["class_0", "class_2"]

    request, _, _ = oip.decode(body({"inputs": [tensor(ROW, [1, 13])], "outputs": [
        {"name": "label"}, {"name": "probabilities", "parameters": {"binary_data": True}}]}), None)
    response = oip.encode(ANSWER, request)
    length = int(response.headers[oip.HEADER_LENGTH])
    header = json.loads(response.body[:length])
    assert [o["name"] for o in header["outputs"]] == ["label", "probabilities"]
    probabilities = np.frombuffer(response.body[length:], "<f4").reshape(2, 3)
    np.testing.assert_allclose(probabilities, ANSWER.probabilities)
    assert header["outputs"][1]["parameters"]["binary_data_size"] == probabilities.nbytes


def test_oip_bytes_outputs_are_length_prefixed() -> None:
    request, _, _ = oip.decode(body({"inputs": [tensor(ROW, [1, 13])], "outputs": [
        {"name": "label", "parameters": {"binary_data": True}}]}), None)
    response = oip.encode(ANSWER, request)
    raw = response.body[int(response.headers[oip.HEADER_LENGTH]):]
    first = struct.unpack("<I", raw[:4])[0]
    assert raw[4:4 + first] == b"class_0"


def test_oip_and_tfserving_answer_a_nan_as_null_in_valid_json() -> None:
    """Their answers are rendered by pydantic-core, as ``/predict``'s are: a model's NaN or infinity is
    ``null``, never the ``NaN`` token JSON does not have (the standard library's renderer refused it)."""
    answer = ANSWER.model_copy(update={"probabilities": [[float("nan"), 0.5, float("inf")], [0.0, 0.5, 0.5]]})
    request, _, _ = oip.decode(body({"inputs": [tensor(ROW, [1, 13])]}), None)
    document = json.loads(oip.encode(answer, request).body, parse_constant=pytest.fail)
    assert document["outputs"][0]["data"][:3] == [None, 0.5, None]
    mixed, _, _ = oip.decode(body({"inputs": [tensor(ROW, [1, 13])], "outputs": [
        {"name": "probabilities"}, {"name": "label", "parameters": {"binary_data": True}}]}), None)
    response = oip.encode(answer, mixed)  # the JSON part before binary tensors, rendered the same way
    header = json.loads(response.body[:int(response.headers[oip.HEADER_LENGTH])], parse_constant=pytest.fail)
    assert header["outputs"][0]["data"][:3] == [None, 0.5, None]
    tf_request, _, _ = tfserving.decode(body({"instances": [ROW]}))
    rendered = rest.JSONAnswer({"predictions": tfserving.encode(answer, tf_request)}).body  # as predict() answers
    assert json.loads(rendered, parse_constant=pytest.fail)["predictions"][0] == [None, 0.5, None]


def test_oip_defaults_left_out_are_shared_and_cannot_be_changed() -> None:
    """A request without ``parameters`` gets the one default instance (no copy a request): it is frozen,
    so no request can change what the next one gets."""
    first, _, _ = oip.decode(body({"inputs": [tensor(ROW, [1, 13])]}), None)
    second, _, _ = oip.decode(body({"inputs": [tensor(ROW, [1, 13])]}), None)
    assert first.parameters is second.parameters and first.inputs[0].parameters is second.inputs[0].parameters
    with pytest.raises(ValidationError):
        first.parameters.binary_data_output = True
    assert second.parameters.binary_data_output is False


# --- TF Serving REST -----------------------------------------------------------------------------

def test_tfserving_decodes_rows_columns_and_named_inputs() -> None:
    assert tfserving.decode(body({"instances": [ROW, ROW]}))[1:] == ("instances", [ROW, ROW])
    assert tfserving.decode(body({"instances": [{"x": ROW}]}))[1:] == ("instances", [ROW])
    assert tfserving.decode(body({"inputs": {"x": [ROW]}}))[1:] == ("inputs", [ROW])


@pytest.mark.parametrize(("document", "field"), [
    ({"instances": [{"x": ROW, "y": ROW}]}, "instances"),
    ({"inputs": 3}, "inputs"),
    ({}, "body"),
    ({"instances": [ROW], "inputs": [ROW]}, "body"),
    ({"instances": [ROW], "signature_name": "other"}, "body"),
])
def test_tfserving_decode_errors_name_the_field(document: dict, field: str) -> None:
    with pytest.raises(RequestError) as raised:
        tfserving.decode(body(document))
    assert raised.value.field == field


def test_tfserving_encodes_each_signature_and_format() -> None:
    default, _, _ = tfserving.decode(body({"instances": [ROW, ROW]}))
    assert tfserving.encode(ANSWER, default) == ANSWER.probabilities
    rows, _, _ = tfserving.decode(body({"instances": [ROW, ROW], "signature_name": "predict"}))
    assert tfserving.encode(ANSWER, rows)[1] == {"probabilities": [0.0, 0.5, 0.5], "label": "class_2"}
    columns, _, _ = tfserving.decode(body({"inputs": [ROW, ROW], "signature_name": "predict"}))
    assert tfserving.encode(ANSWER, columns) == {"probabilities": ANSWER.probabilities,
                                                 "label": ["class_0", "class_2"]}


# --- Native JSON ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def instance() -> type:
    settings = Config.model_validate({"experiments": {"wine": {"salt": "s", "variants": [
        {"name": "a", "model": "wine_sklearn:v1"}, {"name": "b", "model": "wine_sklearn_onnx:v2"}]}}})
    schema = Schema(input_shape=(13,), classes=("class_0", "class_1", "class_2"), feature_names=None, model="wine")
    return native.instance_model(settings, {"wine": schema})


def test_native_instance_decodes_to_one_row(instance: type) -> None:
    request = instance.model_validate({"model": "wine", "inputs": ROW, "user_id": "alice", "variant": "b"}).request
    assert (request.model, request.user_id, request.variant) == ("wine", "alice", "b")
    assert request.rows.shape == (1, 13) and request.rows.dtype == np.float32


@pytest.mark.parametrize(("document", "message"), [
    ({"model": "cancer", "inputs": ROW}, "instances.1.model: unknown model 'cancer'"),
    ({"model": "wine", "inputs": ROW, "variant": "c"}, "instances.1.variant: unknown variant 'c'"),
    ({"model": "wine", "inputs": ROW[:3]},
     r"instances.1.inputs: wine expects 13 features per row "
     r"\(shape \(N, 13\) or \(13,\)\); got shape \(3,\)"),
    ({"model": "wine", "inputs": ROW[:12] + [float("nan")]}, "instances.1.inputs: contains NaN"),
])
def test_native_instance_refuses_what_does_not_fit(instance: type, document: dict, message: str) -> None:
    """The misfit is answered whole (message and body fields), named from the body's top."""
    good = instance.model_validate({"model": "wine", "inputs": ROW})
    with pytest.raises(RequestError, match=message):
        native.instance_requests([good, instance.model_validate(document)])


def test_native_instance_refuses_unknown_fields_while_parsing(instance: type) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        instance.model_validate({"model": "wine", "inputs": ROW, "extra": 1})


# --- Shape errors: what fits, in words and in body fields ----------------------------------------

CANCER = Schema(input_shape=(30,), classes=("malignant", "benign"),
                feature_names=tuple(f"feature {i}" for i in range(30)), model="cancer")
DIGITS = Schema(input_shape=(8, 8), classes=tuple(map(str, range(10))), feature_names=None, model="digits")


def test_a_tabular_shape_error_says_what_fits_and_lists_the_features() -> None:
    with pytest.raises(RequestError) as raised:
        CANCER.batch([1, 2, 3], "inputs", max_rows=8)
    assert raised.value.message == ("cancer expects 30 features per row (shape (N, 30) or (30,)); "
                                    "got shape (3,)")
    document = json.loads(error_response(raised.value).body)
    assert document["field"] == "inputs" and document["expected"] == "shape (N, 30) or (30,)"
    assert document["expected_shape"] == ["N", 30] and document["got_shape"] == [3]
    assert document["features"] == list(CANCER.feature_names)
    flat = json.loads(error_response(raised.value, flat=True).body)
    assert flat == {"error": "inputs: " + raised.value.message}, "the expectation said once, in the message"


def test_an_image_shape_error_says_the_image_shape() -> None:
    with pytest.raises(RequestError) as raised:
        DIGITS.batch([[0.0] * 64], "inputs", max_rows=8)
    assert raised.value.message == ("digits expects 8x8 images (shape (N, 8, 8) or (8, 8)); "
                                    "got shape (1, 64); "
                                    "the values fit if each row is reshaped to (8, 8)")
    assert "features" not in raised.value.body() and raised.value.body()["expected_shape"] == ["N", 8, 8]


def test_a_batch_only_field_refuses_one_row_alone_and_says_how_to_send_it() -> None:
    assert CANCER.batch([[0.0] * 30], "instances", max_rows=8, batched=True).shape == (1, 30)
    with pytest.raises(RequestError) as raised:
        CANCER.batch([0.0] * 30, "instances", max_rows=8, batched=True)
    expected = "cancer expects 30 features per row (shape (N, 30)); got shape (30,)"
    assert raised.value.message.startswith(expected)
    assert "batch of one" in raised.value.message and raised.value.expected == "shape (N, 30)"


# --- Errors: the one mapping for HTTP ------------------------------------------------------------

def test_errors_map_to_status_and_body_in_both_shapes() -> None:
    err = NotFoundError("model", "unknown model 'x'", "wine")
    native_shape = error_response(err)
    assert native_shape.status_code == 404
    assert json.loads(native_shape.body) == {"error": "model: unknown model 'x'", "field": "model",
                                             "expected": "wine"}
    flat = error_response(err, flat=True)
    assert json.loads(flat.body) == {"error": "model: unknown model 'x' (expected wine)"}
    shed = error_response(ServiceUnavailable("queue full"), flat=True)
    assert shed.status_code == 503 and json.loads(shed.body) == {"error": "queue full"}
    overloaded = error_response(OverloadedError(2), headers={"Retry-After": "2"})
    assert overloaded.status_code == 503 and overloaded.headers["retry-after"] == "2"
    assert json.loads(overloaded.body) == {"error": "overloaded: retry later", "retry_after_s": 2}
    unauthorized = error_response(UnauthorizedError("Authorization", "a valid bearer token is required"))
    assert unauthorized.status_code == 401 and unauthorized.headers["www-authenticate"] == "Bearer"
    assert error_response(ForbiddenError("Authorization", "disabled")).status_code == 403
    fault = error_response(ZeroDivisionError("secret detail"))
    assert fault.status_code == 500 and b"secret" not in fault.body


def test_every_protocol_tells_the_front_door_its_paths() -> None:
    paths = Paths.union(native.GUARD, oip.GUARD, tfserving.GUARD)
    assert paths.multipart == {native.IMAGE_PATH, native.JOB_PATH, f"{native.JOB_PATH}/submit"}  # forms with a file
    assert {"/v2/health/live", "/v2/health/ready"} <= paths.probes
    assert "/v2/models/wine/infer".startswith(paths.any_media)
    assert "/v1/models/wine:predict".startswith(paths.any_media)
    assert not "/predict".startswith(paths.any_media)


def test_paths_name_routes_with_a_bounded_set_of_labels() -> None:
    paths = Paths.union(native.GUARD, oip.GUARD, tfserving.GUARD)
    assert paths.label("/predict") == "/predict" and paths.label(native.IMAGE_PATH) == native.IMAGE_PATH
    assert paths.label("/v2/models/wine/versions/onnx-v2/infer") == "/v2/models/*"
    assert paths.label("/v1/models/anything-a-client-types:predict") == "/v1/models/*"
    assert {paths.label(f"/random-{i}") for i in range(100)} == {"other"}
