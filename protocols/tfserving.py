"""TensorFlow Serving's REST API (predict and model status), beside the native endpoints.

A logical model (``digits``) is one TF Serving model; the variants of its A/B experiment are its
versions. ``/v1/models/{model}:predict`` is A/B routed (TF Serving has no user id, so the draw is
random by weight) and ``/versions/{version}:predict`` pins a variant. Every request goes through
the data plane (``serving/dataplane.py``), so the protocol shares the service's runtimes, batches,
routing and metrics.

Two signatures: ``serving_default`` (the default) answers what a Keras classifier exported to TF
Serving answers, the class probabilities; ``predict`` answers ``probabilities`` and ``label`` by name,
as TF Serving answers a multi-output signature.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, model_validator

from common.errors import RequestError
from protocols.guard import Paths
from protocols.rest import (VERSIONED, CurrentDataPlane, JSONAnswer, ProtocolRoute, answers, client_ids,
                            headers, openapi_body, parse, pinned_variant)
from serving import types
from serving.types import BatchPrediction, ClientId

router = APIRouter(route_class=ProtocolRoute)
GUARD = Paths(any_media=("/v1/models/",),
              inference=(r"/v1/models/[^/]+(?:/versions/[^/]+)?:(?:predict|classify|regress)",))
"""TF Serving's documented ``curl -d`` sends a form content type; TF Serving ignores it."""


class PredictRequest(BaseModel):
    signature_name: Literal["serving_default", "predict"] = "serving_default"
    instances: list[Any] | None = None
    inputs: Any = None
    ids: list[ClientId] | None = Field(None, description="your own id per row, echoed; POST /feedback takes it")

    @model_validator(mode="after")
    def _one_format(self) -> PredictRequest:
        if (self.instances is None) == (self.inputs is None):
            raise ValueError('exactly one of "instances" (rows) or "inputs" (columns) is needed')
        return self


class VersionStatus(BaseModel):
    version: str = Field(description="a variant's name")
    state: Literal["AVAILABLE", "END"]
    status: dict[str, str] = Field(description="error_code and error_message, as TF Serving reports them")


class ModelStatus(BaseModel):
    model_version_status: list[VersionStatus]


class PredictResponse(BaseModel):
    predictions: Any = Field(None, description="for instances: one per row, probabilities (serving_default) "
                                               "or {probabilities, label} (predict)")
    outputs: Any = Field(None, description="for inputs: the probabilities, or {probabilities, label} of lists")
    prediction_ids: list[str] = Field(description="one per row, for POST /feedback")
    ids: list[str | None] | None = Field(None, description="the request's ids, echoed")


@router.get("/v1/models/{model}", **answers(ModelStatus))
@router.get("/v1/models/{model}/versions/{version}", dependencies=VERSIONED, **answers(ModelStatus))
def status(model: str, request: Request, dataplane: CurrentDataPlane) -> dict[str, Any]:
    """Every variant (or the one a version names): AVAILABLE once loaded (a worker serves only then), or
    END with the reason when its model failed to load."""
    pinned = pinned_variant(dataplane.router, model, request.path_params.get("version"))
    names = [v.name for v in dataplane.router.experiment(model).variants if pinned in (None, v.name)]
    failed = dataplane.router.failed(model)  # as TF Serving reports a version that failed to load
    return {"model_version_status": [
        {"version": name, "state": "END", "status": {"error_code": "UNKNOWN", "error_message": failed[name]}}
        if name in failed else
        {"version": name, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        for name in names]}


@router.post("/v1/models/{model}:predict", openapi_extra=openapi_body(PredictRequest),
             **answers(PredictResponse))
@router.post("/v1/models/{model}/versions/{version}:predict", dependencies=VERSIONED,
             openapi_extra=openapi_body(PredictRequest), **answers(PredictResponse))
async def predict(model: str, request: Request, dataplane: CurrentDataPlane) -> JSONAnswer:
    variant = pinned_variant(dataplane.router, model, request.path_params.get("version"))
    body, field, tensor = decode(await request.body())
    rows = dataplane.rows(model, tensor, field, batched=True)
    request_ids = client_ids(body.ids, len(rows), "ids")
    [answer] = await dataplane.infer("tfserving", [types.InferenceRequest(model, rows, variant=variant,
                                                                         ids=request_ids)])
    return JSONAnswer({"predictions" if field == "instances" else "outputs": encode(answer, body),
                       "prediction_ids": answer.prediction_ids, **({"ids": answer.ids} if answer.ids else {})},
                      headers=headers(answer))


def decode(raw: bytes) -> tuple[PredictRequest, str, list[Any]]:
    """A predict body, the field that carries its tensor (``instances``: rows; ``inputs``: columns),
    and that tensor as a list of rows; or the 400 that names what is wrong."""
    body = parse(PredictRequest, raw)
    if body.instances is not None:
        field, tensor = "instances", [_unnamed(row, "instances") for row in body.instances]
    else:
        field, tensor = "inputs", _unnamed(body.inputs, "inputs")
    if not isinstance(tensor, list):
        raise RequestError(field, "not a list of rows", "a list with one row per instance")
    return body, field, tensor


def _unnamed(value: Any, field: str) -> Any:
    """A named input ``{"x": tensor}`` as its tensor: these models take one input, whatever its name."""
    if not isinstance(value, dict):
        return value
    if len(value) != 1:
        raise RequestError(field, f"{len(value)} named inputs", "one input: these models take one tensor")
    return next(iter(value.values()))


def encode(answer: BatchPrediction, body: PredictRequest) -> Any:
    """The predictions in the shape the request's signature and format ask for."""
    if body.signature_name == "serving_default":
        return answer.probabilities
    if body.instances is not None:
        return [{"probabilities": p, "label": label} for p, label in zip(answer.probabilities, answer.labels)]
    return {"probabilities": answer.probabilities, "label": answer.labels}
