"""The Open Inference Protocol over gRPC: KServe v2's ``inference.GRPCInferenceService``, as Triton serves it.

tritonclient ships the service's generated stubs (``tritonclient.grpc.service_pb2(_grpc)``): Triton's
``grpc_service.proto`` is KServe's ``grpc_predict_v2.proto`` (same package, service and messages) plus
Triton's own calls, so one servicer answers both kinds of client; the calls it does not serve answer
UNIMPLEMENTED.

The repository extension's calls are REST's (``protocols/repository.py``): their models are stored
model tags (``wine_sklearn:v2``), listed, loaded and unloaded by the same ``ModelRepository`` calls,
load and unload behind the same admin token (``authorization: Bearer`` metadata), with the same
request parameters (``reason``; ``force`` and ``unload_dependents`` to unload).

The meaning is REST OIP's (``protocols/oip.py``, whose metadata, datatypes and tensor checks are reused
here): a logical model is an OIP model, its variants are its versions, ``model_version`` pins one and
without it the A/B split decides, sticky by the request parameter ``user_id`` or the ``user-id``
metadata. Inputs come as ``raw_input_contents`` (binary, what tritonclient sends) or typed
``contents``; outputs go back as ``raw_output_contents``, as Triton answers. The response
``parameters`` carry the variant, its model tag, ``pinned`` and the ``prediction_ids`` (a JSON array in
a string parameter: a parameter holds one scalar), the ids ``POST /feedback`` takes.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, TypeVar
from collections.abc import Callable

import bentoml
import grpc
import numpy as np
from pydantic import BaseModel, TypeAdapter, ValidationError
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from common.errors import RequestError, UnavailableError
from protocols import oip
from protocols.grpc_h2 import Registry
from protocols.grpc_guard import Guard, rpc, user_id
from protocols.repository import LoadParameters, UnloadParameters, tag_readiness
from protocols.rest import client_ids, describe, pinned_variant
from serving import types
from serving.dataplane import DataPlane
from serving.repository import ModelRepository
from serving.types import BatchPrediction, ClientId, UserId

ENDPOINT = "grpc_oip"
"""The data plane's name for these requests in metrics, the prediction log and the report."""
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents"}
"""The typed ``contents`` field of each datatype (FP16 travels as raw bytes only)."""
OUTPUTS = ("probabilities", "label")
USER_IDS = TypeAdapter(UserId)
CLIENT_IDS = TypeAdapter(list[ClientId])
Parameters = TypeVar("Parameters", bound=BaseModel)


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

    def __init__(self, dataplane: DataPlane, guard: Guard):
        self.dataplane = dataplane
        self.guard = guard

    def register(self, registry: Registry) -> None:
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self, registry)

    @rpc()
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc()
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.health()["ready"])

    @rpc()
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        """A logical model's readiness, or a model tag's in this worker as REST answers it (NOT_FOUND
        for a tag not stored; not ready where REST says 503)."""
        name, version = request.name, request.version or None
        if version is None and name not in self.dataplane.router.models and ":" in name:
            try:
                tag_readiness(self.dataplane.catalog, name)
            except UnavailableError:
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=True)
        return pb.ModelReadyResponse(ready=oip.readiness(self.dataplane, name, version))

    @rpc()
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**oip.server_metadata())

    @rpc()
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        described = oip.describe(self.dataplane, request.name, request.version or None)
        return pb.ModelMetadataResponse(
            name=described["name"], versions=described["versions"], platform=described["platform"],
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in described["inputs"]],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in described["outputs"]])

    @rpc()
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest,
                              context: Any) -> pb.RepositoryIndexResponse:
        """Every stored model tag and its state in the worker that answers (READY, LOADING, UNLOADING
        or UNAVAILABLE, with why), as ``POST /v2/repository/index`` lists them (``ready``: the ready
        ones only)."""
        index = await asyncio.to_thread(_repository().index, request.ready)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**m) for m in index])

    @rpc(admin=True)
    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: Any) -> pb.RepositoryModelLoadResponse:
        """Load a stored model in every worker, answered once every live worker has it ready; a model
        that does not reproduce its stored probabilities is refused (INVALID_ARGUMENT, saying why)."""
        parameters = _repository_parameters(LoadParameters, request.parameters)
        await asyncio.to_thread(_repository().load, request.model_name, parameters.reason or "load requested")
        return pb.RepositoryModelLoadResponse()

    @rpc(admin=True)
    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: Any) -> pb.RepositoryModelUnloadResponse:
        """Unload a model from every worker; FAILED_PRECONDITION while a variant routes to it with
        weight above 0, unless the ``force`` parameter is true."""
        parameters = _repository_parameters(UnloadParameters, request.parameters)
        await asyncio.to_thread(_repository().unload, request.model_name, parameters.force,
                                parameters.reason or "unload requested")
        return pb.RepositoryModelUnloadResponse()

    @rpc(inference=True)
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        model = request.model_name
        variant = pinned_variant(self.dataplane.router, model, request.model_version or None)
        wanted = _outputs(request)
        index = oip.input_index(request.inputs)
        field = f"inputs.{index} ({request.inputs[index].name})"
        rows = self.dataplane.rows(model, _tensor(request, index, field), field)
        parameters = request.parameters
        ids = _parameter(parameters, "ids", CLIENT_IDS, json.loads)
        inference = types.InferenceRequest(
            model, rows, _parameter(parameters, "user_id", USER_IDS) or user_id(context), variant,
            client_ids(ids, len(rows), "parameters.ids"))
        [answer] = await self.dataplane.infer(ENDPOINT, [inference])
        return encode(answer, request.id, wanted)


def _repository() -> ModelRepository:
    """The worker's live model repository, where REST's routes find it."""
    return bentoml.get_current_service().repository  # type: ignore[no-any-return]


def _repository_parameters(body: type[Parameters], parameters: Any) -> Parameters:
    """A repository call's ``parameters`` (each holds one scalar) as REST's body parameters, or the
    INVALID_ARGUMENT naming the one at fault (an unknown one included: Triton's ``config``, files)."""
    values = {name: getattr(value, value.WhichOneof("parameter_choice") or "string_param")
              for name, value in parameters.items()}
    try:
        return body.model_validate(values)
    except ValidationError as err:
        raise RequestError("parameters", describe(err)) from None


def _parameter(parameters: Any, name: str, adapter: TypeAdapter,
               parse: Callable[[str], Any] | None = None) -> Any:
    """A string request parameter, validated (``parse`` first: a JSON array for a list), or None."""
    if name not in parameters:
        return None
    value = parameters[name].string_param
    try:
        return adapter.validate_python(parse(value) if parse else value)
    except (ValueError, ValidationError) as err:
        problems = err.errors() if isinstance(err, ValidationError) else [{"msg": str(err)}]
        raise RequestError(f"parameters.{name}", "; ".join(p["msg"] for p in problems),
                           "a JSON array of ids in string_param" if parse else "a string_param") from None


def _outputs(request: pb.ModelInferRequest) -> list[str]:
    """The outputs asked for, in order (all by default), or the 400 naming the unknown one."""
    for i, output in enumerate(request.outputs):
        if output.name not in OUTPUTS:
            raise RequestError(f"outputs.{i}.name", f"unknown output {output.name!r}", " or ".join(OUTPUTS))
    return [o.name for o in request.outputs] or list(OUTPUTS)


def _tensor(request: pb.ModelInferRequest, index: int, field: str) -> np.ndarray:
    """The chosen input as an array of its declared shape, from its raw bytes or its typed contents."""
    tensor = request.inputs[index]
    dtype = oip.datatype(tensor.datatype, field)
    raw = request.raw_input_contents
    if raw:
        if len(raw) != len(request.inputs):
            raise RequestError("raw_input_contents", f"{len(raw)} tensors for {len(request.inputs)} inputs",
                               "one raw tensor per input, in order")
        if len(raw[index]) % dtype.itemsize:
            raise RequestError(f"raw_input_contents.{index}",
                               f"{len(raw[index])} bytes is not a whole number of {tensor.datatype} values")
        array = np.frombuffer(raw[index], dtype=dtype)
    elif tensor.datatype in CONTENTS:
        array = np.asarray(getattr(tensor.contents, CONTENTS[tensor.datatype]), dtype=dtype)
    else:
        raise RequestError(f"{field}.contents", f"{tensor.datatype} has no typed contents",
                           "raw_input_contents")
    return oip.shaped(array, tensor.shape, f"{field}.contents")


def encode(answer: BatchPrediction, request_id: str, wanted: list[str]) -> pb.ModelInferResponse:
    """The wanted outputs as raw little-endian bytes (BYTES: 4-byte length, then the bytes), the
    variant as ``model_version``, and what REST OIP puts in its parameters."""
    tensors = {"probabilities": ("FP32", np.asarray(answer.probabilities, dtype=np.float32)),
               "label": ("BYTES", np.asarray(answer.labels, dtype=object))}
    response = pb.ModelInferResponse(model_name=answer.model, model_version=answer.variant, id=request_id)
    for name in wanted:
        datatype, value = tensors[name]
        response.outputs.add(name=name, datatype=datatype, shape=value.shape)
        response.raw_output_contents.append(oip.tensor_bytes(value))
    parameters = response.parameters
    parameters["variant"].string_param = answer.variant
    parameters["model_tag"].string_param = answer.model_tag
    parameters["pinned"].bool_param = answer.pinned
    parameters["prediction_ids"].string_param = json.dumps(answer.prediction_ids)
    if answer.ids:
        parameters["ids"].string_param = json.dumps(answer.ids)
    return response
