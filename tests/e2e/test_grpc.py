"""Issue 20: OIP and TF Serving's PredictionService over gRPC, by their real clients against the session's
``bentoml serve`` (every test server gets a gRPC port of its own: ``harness/server.py``).

tritonclient's gRPC client (raw tensors), the generated OIP stub (typed contents) and TF Serving's
``PredictionServiceStub`` answer what ``/predict`` answers for every variant; metadata, readiness, the
repository index and ``grpc.health.v1`` report what REST reports; the repository extension loads and
unloads model tags as REST does, behind the admin token; the A/B split assigns a user the same variant
whichever protocol carries the id; each refusal has its status code and a message as clear as REST's,
keys and rate limits included.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import bentoml
import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import yaml
from bentoml._internal.models import ModelStore
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from tritonclient.grpc import service_pb2 as oip_pb2
from tritonclient.grpc import service_pb2_grpc as oip_grpc
from tritonclient.utils import InferenceServerException

from common import config, datasets, store
from harness.server import ServerProcess
from tests import ROOT
from tests.e2e.conftest import ADMIN_TOKEN, FEEDBACK_TOKEN, server_env
from tests.e2e.test_integrity import DAMAGED, flip_a_byte, resave
from tests.e2e.test_repository import save_wine

CONFIG = config.load()
FAMILIES = sorted(CONFIG.experiments)
VARIANTS = [(family, v.name) for family in FAMILIES for v in CONFIG.experiments[family].variants]
ROWS = 3
USERS = 24
POLL_S = 0.1
DEADLINE_S = 15
ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
"""gRPC metadata keys are lower case."""
SPARE = "wine_sklearn:v2"
"""A stored model no experiment of config.yaml routes to: loaded, then unloaded again."""
ROUTED = "wine_sklearn:v1"
"""The model of the wine variant sklearn-v1, weight 1."""


def rows(family: str, count: int = ROWS) -> np.ndarray:
    return np.asarray(datasets.load(family).x_test[:count], dtype=np.float32)


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_target) as opened:
        yield opened


@pytest.fixture(scope="module")
def triton_client(server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(server.grpc_target)
    yield client
    client.close()


@pytest.fixture(scope="module")
def tf_stub(channel: grpc.Channel):  # type: ignore[no-untyped-def]
    """TF Serving's own stub (its module imports TensorFlow: loaded only when these tests run, and after
    triton, through common/tf_env.py: triton loaded after TensorFlow crashes the test process later)."""
    import common.tf_env  # noqa: F401
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


def rest_predict(client: httpx.Client, family: str, data: np.ndarray, **fields: str) -> list[dict]:
    response = client.post("/predict", json={"instances": [
        {"model": family, "inputs": row.tolist(), **fields} for row in data]})
    assert response.status_code == 200, response.text
    return response.json()


def triton_infer(client: triton.InferenceServerClient, family: str, data: np.ndarray,
                 **kwargs: object) -> triton.InferResult:
    tensor = triton.InferInput("input", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    return client.infer(family, [tensor], **kwargs)


def typed_request(family: str, data: np.ndarray, **fields: object) -> oip_pb2.ModelInferRequest:
    """An OIP request with typed ``contents`` (what tritonclient never sends), built from the stub."""
    request = oip_pb2.ModelInferRequest(model_name=family, **fields)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=data.shape)
    tensor.contents.fp32_contents.extend(data.ravel().tolist())
    return request


def tf_request(family: str, data: np.ndarray, signature: str = "", version: str | None = None):  # type: ignore[no-untyped-def]
    from common.tf_env import tf  # isort: skip  (first: it loads triton before TensorFlow)
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = family
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version_label = version
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(data))
    return request


def tensor_values(proto) -> np.ndarray:  # type: ignore[no-untyped-def]
    from common.tf_env import tf

    return tf.make_ndarray(proto)


def refusal(call) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


# Health, metadata, readiness, repository


def test_health_readiness_and_server_metadata(triton_client: triton.InferenceServerClient,
                                              channel: grpc.Channel, client: httpx.Client) -> None:
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    metadata = triton_client.get_server_metadata(as_json=True)
    assert metadata["name"] == client.get("/v2").json()["name"]
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "inference.GRPCInferenceService", "tensorflow.serving.PredictionService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert client.get("/readyz").status_code == 200  # the verdict the health service reflects
    assert refusal(lambda: health.Check(health_pb2.HealthCheckRequest(service="nope"))).code() == \
        grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def unready(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server whose one model was damaged on disk after it was stored: it starts, and no model can
    answer, so the worker is not ready (``/readyz`` 503)."""
    folder = tmp_path_factory.mktemp("unready")
    models = ModelStore(folder / "bentoml_home" / "models")
    resave(DAMAGED, models)
    flip_a_byte(store.model_file(models.get(DAMAGED)))
    (folder / "config.yaml").write_text(yaml.safe_dump({"service": {"workers": 1}, "experiments": {
        "wine": {"salt": "w", "variants": [{"name": "onnx-v2", "model": DAMAGED}]}}}))
    env = {**os.environ, "BENTOML_HOME": str(folder / "bentoml_home"), "BUNDLE_CONFIG": str(folder / "config.yaml")}
    running = ServerProcess("service:Bundle", ROOT, env, folder, ready_path="/livez")
    yield running
    running.stop()


@pytest.mark.slow  # a server of its own
def test_health_is_not_serving_while_no_model_can_answer(unready: ServerProcess) -> None:
    wait_for(lambda: httpx.get(f"{unready.url}/readyz").headers.get("content-type") == "application/json")
    report = httpx.get(f"{unready.url}/readyz")
    assert report.status_code == 503 and report.json()["checks"]["models"]["unavailable"], report.text
    with grpc.insecure_channel(unready.grpc_target) as opened:
        health = health_pb2_grpc.HealthStub(opened)

        def status(service: str) -> int | None:
            try:
                return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            except grpc.RpcError:  # the worker's gRPC server is not up yet
                return None

        wait_for(lambda: status("") is not None)
        for service in ("", "inference.GRPCInferenceService", "tensorflow.serving.PredictionService"):
            assert status(service) == health_pb2.HealthCheckResponse.NOT_SERVING, service
    client = triton.InferenceServerClient(unready.grpc_target)
    try:
        assert client.is_server_live() and not client.is_server_ready()
    finally:
        client.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_model_metadata_and_readiness_match_rest(triton_client: triton.InferenceServerClient,
                                                 client: httpx.Client, family: str) -> None:
    rest = client.get(f"/v2/models/{family}").json()
    assert triton_client.get_model_metadata(family, as_json=True) == {
        **rest, "inputs": [{**t, "shape": [str(s) for s in t["shape"]]} for t in rest["inputs"]],
        "outputs": [{**t, "shape": [str(s) for s in t["shape"]]} for t in rest["outputs"]]}  # int64 as JSON strings
    assert triton_client.is_model_ready(family)
    for version in rest["versions"]:
        assert triton_client.is_model_ready(family, version)


def grpc_index(triton_client: triton.InferenceServerClient) -> dict[str, dict[str, str]]:
    """Tag -> the gRPC index's entry (JSON leaves out empty strings: the reason of a ready model)."""
    models = triton_client.get_model_repository_index(as_json=True).get("models", [])
    return {m["name"]: {"name": m["name"], "version": m.get("version", ""), "state": m.get("state", ""),
                        "reason": m.get("reason", "")} for m in models}


def rest_index(client: httpx.Client) -> dict[str, dict[str, str]]:
    answer = client.post("/v2/repository/index")
    assert answer.status_code == 200, answer.text
    return {m["name"]: m for m in answer.json()}


def is_ready_over_rest(client: httpx.Client, tag: str) -> bool:
    status = client.get(f"/v2/models/{tag}/ready").status_code
    assert status in (200, 503)
    return status == 200


def test_repository_index_lists_the_tags_and_states_rest_lists(triton_client: triton.InferenceServerClient,
                                                               channel: grpc.Channel, client: httpx.Client) -> None:
    for _ in range(3):  # the test store is shared: another session may store a tag between the two calls
        listed, rest = grpc_index(triton_client), rest_index(client)
        if listed == rest:
            break
    assert listed == rest
    served = {v.model for family in FAMILIES for v in CONFIG.experiments[family].variants}
    ready = {tag for tag, m in listed.items() if m["state"] == "READY"}
    assert ready >= served and listed[SPARE]["state"] == "UNAVAILABLE" and listed[SPARE]["reason"] == "unloaded"
    ready_only = oip_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(oip_pb2.RepositoryIndexRequest(ready=True))
    assert {m.name for m in ready_only.models} == ready


def test_repository_load_and_unload_change_readiness_over_both_protocols(
        triton_client: triton.InferenceServerClient, client: httpx.Client) -> None:
    assert not triton_client.is_model_ready(SPARE) and not is_ready_over_rest(client, SPARE)
    triton_client.load_model(SPARE, headers=ADMIN)
    try:
        assert triton_client.is_model_ready(SPARE) and is_ready_over_rest(client, SPARE)
        assert grpc_index(triton_client)[SPARE]["state"] == rest_index(client)[SPARE]["state"] == "READY"
    finally:
        triton_client.unload_model(SPARE, headers=ADMIN)
    assert not triton_client.is_model_ready(SPARE) and not is_ready_over_rest(client, SPARE)
    assert grpc_index(triton_client)[SPARE]["state"] == rest_index(client)[SPARE]["state"] == "UNAVAILABLE"


def test_unloading_a_weighted_model_is_a_failed_precondition(triton_client: triton.InferenceServerClient,
                                                             client: httpx.Client) -> None:
    with pytest.raises(InferenceServerException) as caught:
        triton_client.unload_model(ROUTED, headers=ADMIN)
    assert caught.value.status() == "StatusCode.FAILED_PRECONDITION"
    assert "still takes traffic as wine/sklearn-v1" in caught.value.message()
    assert triton_client.is_model_ready(ROUTED) and is_ready_over_rest(client, ROUTED)


@pytest.mark.parametrize(("call", "code", "named"), [
    (lambda c: c.load_model(SPARE), "UNAUTHENTICATED", "a valid bearer token is required"),
    (lambda c: c.unload_model(ROUTED, headers={"authorization": "Bearer wrong"}), "UNAUTHENTICATED",
     "a valid bearer token is required"),
    (lambda c: c.load_model("nope_model:v1", headers=ADMIN), "NOT_FOUND", "nope_model:v1"),
    (lambda c: c.load_model(SPARE, headers=ADMIN, config="{}"), "INVALID_ARGUMENT", "parameters: config"),
    (lambda c: c.is_model_ready("nope_model:v1"), "NOT_FOUND", "nope_model:v1"),
])
def test_repository_refusals_have_their_codes_and_change_nothing(triton_client: triton.InferenceServerClient,
                                                                 call, code: str, named: str) -> None:  # type: ignore[no-untyped-def]
    before = grpc_index(triton_client)
    with pytest.raises(InferenceServerException) as caught:
        call(triton_client)
    assert caught.value.status() == f"StatusCode.{code}" and named in caught.value.message(), caught.value
    assert grpc_index(triton_client) == before


def test_a_model_that_fails_its_parity_check_is_an_invalid_argument(triton_client: triton.InferenceServerClient,
                                                                   client: httpx.Client) -> None:
    tag = f"wine_sklearn:v9{secrets.token_hex(4)}"
    save_wine(tag, test_probs=store.stored_test_probs(store.get(SPARE)))
    try:
        with pytest.raises(InferenceServerException) as caught:
            triton_client.load_model(tag, headers=ADMIN)
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "stored test probabilities" in caught.value.message()
        assert not triton_client.is_model_ready(tag) and not is_ready_over_rest(client, tag)
        assert "refused" in grpc_index(triton_client)[tag]["reason"]
    finally:
        bentoml.models.delete(tag)


def test_tfserving_model_metadata_describes_both_signatures(tf_stub, channel: grpc.Channel) -> None:  # type: ignore[no-untyped-def]
    from tensorflow_serving.apis import get_model_metadata_pb2

    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "wine"
    answer = tf_stub.GetModelMetadata(request)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    answer.metadata["signature_def"].Unpack(signatures)
    default, predict = signatures.signature_def["serving_default"], signatures.signature_def["predict"]
    assert [d.size for d in default.inputs["input"].tensor_shape.dim] == [-1, 13]
    assert set(default.outputs) == {"probabilities", "prediction_ids"}
    assert set(predict.outputs) == {"probabilities", "label", "prediction_ids"}


# Inference: the same answers as /predict


@pytest.mark.parametrize(("family", "variant"), VARIANTS)
def test_every_client_answers_what_predict_answers(client: httpx.Client, triton_client: triton.InferenceServerClient,
                                                   channel: grpc.Channel, tf_stub, family: str,  # type: ignore[no-untyped-def]
                                                   variant: str) -> None:
    data = rows(family)
    expected = rest_predict(client, family, data, variant=variant)
    labels = [p["label"] for p in expected]
    probabilities = np.asarray([p["probabilities"] for p in expected], dtype=np.float32)

    raw = triton_infer(triton_client, family, data, model_version=variant)
    assert raw.get_response().model_version == variant
    assert [label.decode() for label in raw.as_numpy("label")] == labels
    np.testing.assert_array_equal(raw.as_numpy("probabilities"), probabilities)

    typed = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(typed_request(family, data, model_version=variant))
    assert typed.model_version == variant
    assert np.frombuffer(typed.raw_output_contents[0], "<f4").reshape(probabilities.shape).tolist() == \
        probabilities.tolist()

    answer = tf_stub.Predict(tf_request(family, data, "predict", version=variant))
    assert answer.model_spec.version_label == variant
    assert [label.decode() for label in tensor_values(answer.outputs["label"])] == labels
    np.testing.assert_array_equal(tensor_values(answer.outputs["probabilities"]), probabilities)
    assert len(set(tensor_values(answer.outputs["prediction_ids"]))) == len(data)


def test_oip_answer_carries_prediction_ids_that_feedback_takes(client: httpx.Client,
                                                               triton_client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("input", [2, 13], "FP32")
    tensor.set_data_from_numpy(rows("wine", 2))
    answer = triton_client.infer("wine", [tensor], parameters={"ids": json.dumps(["mine-1", "mine-2"])})
    parameters = answer.get_response().parameters
    ids = json.loads(parameters["prediction_ids"].string_param)
    assert len(set(ids)) == 2 and json.loads(parameters["ids"].string_param) == ["mine-1", "mine-2"]
    assert parameters["variant"].string_param == answer.get_response().model_version
    label = answer.as_numpy("label")[0].decode()
    deadline = time.monotonic() + DEADLINE_S  # the prediction log is written in batches
    while True:
        result = client.post("/feedback", headers={"Authorization": f"Bearer {FEEDBACK_TOKEN}"},
                             json={"feedback": [{"prediction_id": ids[0], "label": label}]}).json()
        if result["results"][0]["status"] != "unknown_id" or time.monotonic() > deadline:
            break
        time.sleep(POLL_S)
    assert result["results"][0]["status"] == "matched", result


def test_ab_split_assigns_each_user_the_variant_rest_gives(client: httpx.Client, channel: grpc.Channel,
                                                           triton_client: triton.InferenceServerClient,
                                                           tf_stub) -> None:  # type: ignore[no-untyped-def]
    data = rows("wine", 1)
    seen = set()
    for user in (f"user-{i}" for i in range(USERS)):
        [rest] = rest_predict(client, "wine", data, user_id=user)
        by_parameter = triton_infer(triton_client, "wine", data, parameters={"user_id": user})
        by_metadata = triton_infer(triton_client, "wine", data, headers={"user-id": user})
        tf_answer = tf_stub.Predict(tf_request("wine", data), metadata=[("user-id", user)])
        assert {by_parameter.get_response().model_version, by_metadata.get_response().model_version,
                tf_answer.model_spec.version_label} == {rest["variant"]}, user
        seen.add(rest["variant"])
    assert seen == {v.name for v in CONFIG.experiments["wine"].variants}  # both halves of the split


# Refusals


def test_bad_shape_names_the_expected_shape(triton_client: triton.InferenceServerClient, tf_stub) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceServerException) as caught:
        triton_infer(triton_client, "wine", np.ones((2, 12), np.float32))
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "13 features" in caught.value.message() and "(N, 13)" in caught.value.message()
    error = refusal(lambda: tf_stub.Predict(tf_request("wine", np.ones((2, 12), np.float32))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "(N, 13)" in error.details()


def test_raw_and_typed_contents_are_checked(channel: grpc.Channel) -> None:
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    request = typed_request("wine", rows("wine", 1))
    request.inputs[0].shape[:] = [1, 14]
    error = refusal(lambda: stub.ModelInfer(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "13 values for shape [1, 14]" in error.details()
    raw = oip_pb2.ModelInferRequest(model_name="wine", raw_input_contents=[b"\0" * 51])
    raw.inputs.add(name="input", datatype="FP32", shape=[1, 13])
    error = refusal(lambda: stub.ModelInfer(raw))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "whole number of FP32" in error.details()
    raw.inputs[0].datatype = "FP8"
    assert "FP32" in refusal(lambda: stub.ModelInfer(raw)).details()


@pytest.mark.parametrize(("model", "version"), [("nope", None), ("wine", "v9"), ("wine", "no-such-variant")])
def test_unknown_model_or_version_is_not_found(triton_client: triton.InferenceServerClient, tf_stub,  # type: ignore[no-untyped-def]
                                                model: str, version: str | None) -> None:
    data = rows("wine", 1)
    with pytest.raises(InferenceServerException) as caught:
        triton_infer(triton_client, model, data, model_version=version or "")
    assert caught.value.status() == "StatusCode.NOT_FOUND" and repr(version or model) in caught.value.message()
    error = refusal(lambda: tf_stub.Predict(tf_request(model, data, version=version)))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_oversized_message_and_too_many_rows_exhaust_resources(triton_client: triton.InferenceServerClient) -> None:
    too_big = np.ones((CONFIG.limits.max_body_bytes // (13 * 4) + 1, 13), np.float32)
    with pytest.raises(InferenceServerException) as caught:
        triton_infer(triton_client, "wine", too_big)
    assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    with pytest.raises(InferenceServerException) as caught:
        triton_infer(triton_client, "wine", np.ones((CONFIG.limits.max_rows + 1, 13), np.float32))
    assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert f"at most {CONFIG.limits.max_rows} rows" in caught.value.message()


# Keys and rate limits: the session server's configuration is edited live, then restored.

KEY = "grpc-test-key"
ACCESS = {"require_keys": True, "keys": [{"name": "grpc", "sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                                          "rate_limit": {"requests": 2, "per_s": 3600}}]}


def wait_for(check) -> None:  # type: ignore[no-untyped-def]
    """Until ``check()`` holds (the configuration watcher applies an edit within a poll; a worker
    starts its gRPC server once its models are loaded)."""
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        assert time.monotonic() < deadline, "the awaited state did not come in time"
        time.sleep(POLL_S)


def replace_config(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def test_keys_and_rate_limits_apply_to_inference_calls(server: ServerProcess, channel: grpc.Channel) -> None:
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    request = typed_request("wine", rows("wine", 1))

    def code(metadata: tuple = ()) -> grpc.StatusCode:
        try:
            stub.ModelInfer(request, metadata=metadata)
        except grpc.RpcError as err:
            return err.code()
        return grpc.StatusCode.OK

    path = Path(server.env["BUNDLE_CONFIG"])
    original = path.read_text()
    keyed = yaml.safe_load(original)
    keyed["access"] = {**keyed.get("access", {}), **ACCESS}
    replace_config(path, yaml.safe_dump(keyed))
    try:
        wait_for(lambda: code() == grpc.StatusCode.UNAUTHENTICATED)
        error = refusal(lambda: stub.ModelInfer(request, metadata=[("x-api-key", "wrong")]))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "unknown or revoked" in error.details()
        assert stub.ServerReady(oip_pb2.ServerReadyRequest()).ready  # probes need no key
        limited = None
        for _ in range(3):  # two admitted by the key's bucket, then refused with the wait
            try:
                stub.ModelInfer(request, metadata=[("authorization", f"Bearer {KEY}")])
            except grpc.RpcError as err:
                limited = err
                break
        assert limited is not None and limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        retry = error_details_pb2.RetryInfo()
        assert rpc_status.from_call(limited).details[0].Unpack(retry) and retry.retry_delay.seconds > 0
        assert dict(limited.trailing_metadata())["retry-after"] == str(retry.retry_delay.seconds)
    finally:
        replace_config(path, original)
        wait_for(lambda: code() == grpc.StatusCode.OK)


def test_benchmark_drives_both_protocols_without_errors(server: ServerProcess) -> None:
    """``python -m bench.grpc``'s comparison, briefly, against the session server (numbers: the benchmark)."""
    from bench import grpc as bench_grpc

    results = asyncio.run(bench_grpc.compare(server.url, server.grpc_target, seconds=0.5, concurrencies=(2,),
                                             repeats=1))
    assert [r.name for r in results] == ["/predict (REST, JSON) c=2", "gRPC OIP (binary) c=2"]
    assert all(r.requests > 0 and r.statuses["error"] == 0 for r in results)
    assert "| gRPC OIP (binary) | 2 |" in bench_grpc.markdown(results)
