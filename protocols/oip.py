"""Open Inference Protocol v2 over REST (KServe v2, Triton, MLServer), beside the native endpoints.

A logical model (``digits``) is one OIP model; the variants of its A/B experiment are its versions.
``/v2/models/{model}/infer`` is A/B routed (sticky with the request parameter ``user_id``), and
``/versions/{version}/infer`` pins a variant. Every request goes through the data plane
(``serving/dataplane.py``), so the protocol shares the service's runtimes, batches, routing and
metrics. Triton's binary tensor data extension is served both ways: Triton's own clients send and
ask for binary tensors by default.
"""

from __future__ import annotations

import math
import struct
from typing import Annotated, Any, Literal, Protocol
from collections.abc import Sequence

import bentoml
import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt

from common.errors import RequestError
from protocols.guard import Paths
from protocols.repository import tag_readiness
from protocols.rest import (VERSIONED, CurrentDataPlane, JSONAnswer, ProtocolRoute, answers, client_ids,
                            headers, json_bytes, openapi_body, parse, pinned_variant)
from serving import types
from serving.dataplane import DataPlane
from serving.types import BatchPrediction, ClientId, UserId

router = APIRouter(route_class=ProtocolRoute)
GUARD = Paths(probes=frozenset({"/v2/health/live", "/v2/health/ready"}), any_media=("/v2/models/",),
              inference=(r"/v2/models/[^/]+(?:/versions/[^/]+)?/infer",))
"""Triton's client sends no content type (and binary tensors after the JSON); Triton ignores it."""

HEADER_LENGTH = "Inference-Header-Content-Length"
"""Binary extension: the JSON part is this many bytes of the body; tensor bytes follow it."""
INPUT = "input"
DATATYPES = {name: np.dtype(code) for name, code in (
    ("BOOL", "?"), ("UINT8", "u1"), ("UINT16", "<u2"), ("UINT32", "<u4"), ("UINT64", "<u8"),
    ("INT8", "i1"), ("INT16", "<i2"), ("INT32", "<i4"), ("INT64", "<i8"),
    ("FP16", "<f2"), ("FP32", "<f4"), ("FP64", "<f8"))}


class Named(Protocol):
    """An input tensor of either wire format (REST's JSON model, gRPC's message): it has a name."""

    name: str


JSON_KINDS = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}
"""The numpy kinds JSON data may parse to, per datatype kind: integers are valid floats, not bools."""


FROZEN = ConfigDict(frozen=True)
"""For the parameter models that are another model's default: pydantic deep-copies an unhashable default
for every request that leaves it out (3 us each, a tenth of OIP's decoding and encoding); a frozen one
is hashable and shared."""


class InputParameters(BaseModel):
    model_config = FROZEN
    binary_data_size: NonNegativeInt | None = None


class InputTensor(BaseModel):
    name: str
    shape: list[NonNegativeInt]
    datatype: str
    parameters: InputParameters = InputParameters()
    data: Any = None


class OutputParameters(BaseModel):
    model_config = FROZEN
    binary_data: bool | None = None


class OutputRequest(BaseModel):
    name: Literal["probabilities", "label"]
    parameters: OutputParameters = OutputParameters()


class RequestParameters(BaseModel):
    model_config = FROZEN
    user_id: UserId | None = Field(None, description="makes the A/B assignment sticky")
    binary_data_output: bool = False
    ids: list[ClientId] | None = Field(None, description="your own id per row, echoed; POST /feedback takes it")


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: RequestParameters = RequestParameters()
    inputs: Annotated[list[InputTensor], Field(min_length=1)]
    outputs: list[OutputRequest] | None = None


ALL_OUTPUTS = (OutputRequest(name="probabilities"), OutputRequest(name="label"))
"""What an answer carries when the request names no outputs, in this order."""


class ServerMetadata(BaseModel):
    name: str
    version: str = Field(description="BentoML's version")
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for the batch dimension")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="variant names, each accepted as /versions/{version}")
    platform: str = Field(description="the variant's runtime, or every variant's joined with +")
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ModelReady(BaseModel):
    name: str
    ready: bool


class BinaryOutputParameters(BaseModel):
    binary_data_size: NonNegativeInt = Field(description="this output's bytes after the JSON part")


class OutputTensor(BaseModel):
    name: Literal["probabilities", "label"]
    datatype: Literal["FP32", "BYTES"]
    shape: list[NonNegativeInt]
    data: list[float] | list[str] | None = Field(None, description="left out when the output is binary")
    parameters: BinaryOutputParameters | None = Field(None, description="only for a binary output")


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str = Field(description="the variant that answered")
    id: str | None = Field(None, description="the request's id, echoed when it has one")
    parameters: dict[str, Any] = Field(description="variant, model_tag, pinned, prediction_ids, ids")
    outputs: list[OutputTensor]


BINARY = "application/octet-stream"
BINARY_SCHEMA = {"schema": {"type": "string", "format": "binary"}}
JSON_BODY = openapi_body(InferenceRequest)["requestBody"]
INFER_REQUEST = {
    "requestBody": {**JSON_BODY, "content": {**JSON_BODY["content"], BINARY: BINARY_SCHEMA}, "description": (
        f"JSON, or with the binary tensor data extension the JSON request ({HEADER_LENGTH} bytes) followed "
        "by the raw little-endian bytes of each input whose parameters.binary_data_size is set")},
    "parameters": [{
        "name": HEADER_LENGTH, "in": "header", "required": False, "schema": {"type": "integer", "minimum": 0},
        "description": "binary tensor data extension: the length of the JSON part of the body"}],
}
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {200: {
    "model": InferenceResponse,
    "description": f"JSON; {BINARY} when an output is asked as binary: the JSON answer ({HEADER_LENGTH} "
                   "bytes), then each binary output's bytes (BYTES: a 4-byte little-endian length, then the "
                   "bytes)",
    "content": {BINARY: BINARY_SCHEMA},
    "headers": {HEADER_LENGTH: {"description": "with a binary answer: the length of its JSON part",
                                "schema": {"type": "integer"}}}}}
"""The infer routes read their body themselves (JSON, or JSON then binary tensors), so it is documented
here; ``encode`` answers JSON or, for binary outputs, JSON then bytes."""


@router.get("/v2/health/live")
def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready")
def ready(dataplane: CurrentDataPlane) -> dict[str, bool]:
    """The worker's readiness, as ``/readyz`` decides it (``DataPlane.health``)."""
    return {"ready": dataplane.health()["ready"]}


@router.get("/v2", **answers(ServerMetadata))
def server_metadata() -> dict[str, Any]:
    return {"name": "bentoml-bundle", "version": bentoml.__version__, "extensions": ["binary_tensor_data"]}


@router.get("/v2/models/{model}", **answers(ModelMetadata))
@router.get("/v2/models/{model}/versions/{version}", dependencies=VERSIONED, **answers(ModelMetadata))
def model_metadata(model: str, request: Request, dataplane: CurrentDataPlane) -> dict[str, Any]:
    return describe(dataplane, model, request.path_params.get("version"))


def describe(dataplane: DataPlane, model: str, version: str | None) -> dict[str, Any]:
    """A model's metadata (REST and gRPC). Versions are variant names; ``platform`` is the runtime of
    the variant, or of all variants joined with ``+`` for the unversioned, A/B-routed model."""
    pinned = pinned_variant(dataplane.router, model, version)
    variants = [v for v in dataplane.catalog.describe(dataplane.router)[model]["variants"]
                if not v["shadow"] and pinned in (None, v["name"])]
    schema = dataplane.schema(model)
    return {
        "name": model,
        "versions": [v["name"] for v in variants],
        "platform": "+".join(dict.fromkeys(v["labels"]["runtime"] for v in variants)),
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, *schema.input_shape]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(schema.classes)]},
                    {"name": "label", "datatype": "BYTES", "shape": [-1]}],
    }


@router.get("/v2/models/{model}/ready", **answers(ModelReady))
@router.get("/v2/models/{model}/versions/{version}/ready", dependencies=VERSIONED, **answers(ModelReady))
def model_ready(model: str, request: Request, dataplane: CurrentDataPlane) -> dict[str, Any]:
    """A logical model's readiness; a model tag's (``wine_sklearn:v2``, the repository extension's
    models) in this worker, as ``protocols/repository.py`` answers it."""
    version = request.path_params.get("version")
    if version is None and model not in dataplane.router.models and ":" in model:
        return tag_readiness(dataplane.catalog, model)
    return {"name": model, "ready": readiness(dataplane, model, version)}


def readiness(dataplane: DataPlane, model: str, version: str | None) -> bool:
    """Not ready (REST and gRPC): the version's variant failed to load, or (unversioned) no variant can
    answer."""
    router = dataplane.router
    variant = pinned_variant(router, model, version)
    return variant not in router.failed(model) if variant else router.unavailable(model) is None


@router.post("/v2/models/{model}/infer", openapi_extra=INFER_REQUEST, responses=INFER_RESPONSES)
@router.post("/v2/models/{model}/versions/{version}/infer", dependencies=VERSIONED,
             openapi_extra=INFER_REQUEST, responses=INFER_RESPONSES)
async def infer(model: str, request: Request, dataplane: CurrentDataPlane) -> Response:
    variant = pinned_variant(dataplane.router, model, request.path_params.get("version"))
    body, tensor, field = decode(await request.body(), request.headers.get(HEADER_LENGTH))
    rows = dataplane.rows(model, tensor, field)
    inference = types.InferenceRequest(model, rows, body.parameters.user_id, variant,
                                       client_ids(body.parameters.ids, len(rows), "parameters.ids"))
    [answer] = await dataplane.infer("oip", [inference])
    return encode(answer, body)


def decode(raw: bytes, header_length: str | None) -> tuple[InferenceRequest, np.ndarray, str]:
    """A request body (JSON, or JSON then binary tensors), its one input as an array of its declared
    shape, and that input's field name for errors; or the 400 that names what is wrong."""
    header, binary = _split(raw, header_length)
    body = parse(InferenceRequest, header)
    index = input_index(body.inputs)
    field = f"inputs.{index} ({body.inputs[index].name})"
    return body, _tensor(body.inputs, index, binary, field), field


def _split(raw: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON part and the binary part of a body (all JSON without the extension's header)."""
    if header_length is None:
        return raw, b""
    if not header_length.isdigit() or int(header_length) > len(raw):
        raise RequestError(HEADER_LENGTH, f"{header_length!r} is not a length within the body",
                           f"at most {len(raw)}")
    return raw[:int(header_length)], raw[int(header_length):]


def input_index(inputs: Sequence[Named]) -> int:
    """These models take one tensor: the only input, whatever its name, or the one named ``input``."""
    if len(inputs) == 1:
        return 0
    named = [i for i, tensor in enumerate(inputs) if tensor.name == INPUT]
    if len(named) != 1:
        raise RequestError("inputs", f"{len(inputs)} input tensors", f"one tensor, or one named {INPUT!r}")
    return named[0]


def _tensor(inputs: list[InputTensor], index: int, binary: bytes, field: str) -> np.ndarray:
    """The chosen input as an array of its declared shape, from its binary bytes or its JSON data."""
    tensor = inputs[index]
    dtype = datatype(tensor.datatype, field)
    sizes = [t.parameters.binary_data_size or 0 for t in inputs]
    if sum(sizes) != len(binary):
        raise RequestError("binary data", f"{len(binary)} bytes after the JSON",
                           f"{sum(sizes)}, the sum of the inputs' binary_data_size")
    if tensor.parameters.binary_data_size is None:
        array = _json_data(tensor, dtype, field)
    elif sizes[index] % dtype.itemsize:
        raise RequestError(f"{field}.parameters.binary_data_size",
                           f"{sizes[index]} bytes is not a whole number of {tensor.datatype} values")
    else:
        array = np.frombuffer(binary[sum(sizes[:index]):sum(sizes[:index + 1])], dtype=dtype)
    return shaped(array, tensor.shape, f"{field}.data")


def datatype(name: str, field: str) -> np.dtype:
    """The numpy type of an input's declared datatype, or the 400 that lists the accepted ones."""
    dtype = DATATYPES.get(name)
    if dtype is None:
        raise RequestError(f"{field}.datatype", f"{name!r} is not a datatype these models take",
                           f"FP32 (the models' input), or a number type converted to it: {', '.join(DATATYPES)}")
    return dtype


def shaped(array: np.ndarray, shape: Sequence[int], field: str) -> np.ndarray:
    """Flat or nested ``array`` as the declared ``shape``, or the 400 that says how many values fit."""
    expected = math.prod(shape)  # np.prod wraps around at 2**63
    if array.size != expected:
        raise RequestError(field, f"{array.size} values for shape {list(shape)}", f"{expected} values")
    return array.reshape(shape)


def _json_data(tensor: InputTensor, dtype: np.dtype, field: str) -> np.ndarray:
    """``data``, flat or nested, with values that fit the declared datatype."""
    if tensor.data is None:
        raise RequestError(f"{field}.data", "missing", "the values, or parameters.binary_data_size")
    try:
        array = np.asarray(tensor.data)
    except ValueError:
        raise RequestError(f"{field}.data", "ragged nested lists", "a flat or a nested list") from None
    if array.dtype.kind not in JSON_KINDS[dtype.kind]:
        raise RequestError(f"{field}.data", f"values that are not {tensor.datatype}",
                           f"{tensor.datatype} numbers")
    return array


def encode(answer: BatchPrediction, body: InferenceRequest) -> Response:
    """The requested outputs (all by default), each as JSON data or, when asked, binary bytes.

    ``model_version`` is the variant that answered, a name ``/versions/{version}`` accepts back; the
    response parameters and the ``X-Variant`` header carry it too, with its model tag.
    """
    tensors = {"probabilities": ("FP32", np.asarray(answer.probabilities, dtype=np.float32)),
               "label": ("BYTES", np.asarray(answer.labels, dtype=object))}
    outputs, chunks = [], []
    for wanted in body.outputs or ALL_OUTPUTS:
        datatype, value = tensors[wanted.name]
        output: dict[str, Any] = {"name": wanted.name, "datatype": datatype, "shape": list(value.shape)}
        binary = wanted.parameters.binary_data
        if body.parameters.binary_data_output if binary is None else binary:
            chunks.append(tensor_bytes(value))
            output["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            output["data"] = value.ravel().tolist()
        outputs.append(output)
    document = {
        "model_name": answer.model,
        "model_version": answer.variant,
        **({"id": body.id} if body.id is not None else {}),
        "parameters": {"variant": answer.variant, "model_tag": answer.model_tag, "pinned": answer.pinned,
                       "prediction_ids": answer.prediction_ids, **({"ids": answer.ids} if answer.ids else {})},
        "outputs": outputs,
    }
    if not chunks:
        return JSONAnswer(document, headers=headers(answer))
    header = json_bytes(document)
    return Response(header + b"".join(chunks), media_type="application/octet-stream",
                    headers={**headers(answer), HEADER_LENGTH: str(len(header))})


def tensor_bytes(value: np.ndarray) -> bytes:
    """Binary extension layout: raw little-endian numbers; BYTES as 4-byte length, then the bytes."""
    if value.dtype != object:
        return value.astype(value.dtype.newbyteorder("<")).tobytes()
    return b"".join(struct.pack("<I", len(item)) + item for item in (str(v).encode() for v in value.ravel()))
