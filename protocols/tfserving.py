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
from pydantic import BaseModel, model_validator
from starlette.responses import JSONResponse

from common.errors import RequestError
from protocols.guard import Paths
from protocols.rest import CurrentDataPlane, ProtocolRoute, parse, pinned_variant
from serving import types
from serving.types import BatchPrediction

router = APIRouter(route_class=ProtocolRoute)
GUARD = Paths(any_media=("/v1/models/",))
"""TF Serving's documented ``curl -d`` sends a form content type; TF Serving ignores it."""


class PredictRequest(BaseModel):
    signature_name: Literal["serving_default", "predict"] = "serving_default"
    instances: list[Any] | None = None
    inputs: Any = None

    @model_validator(mode="after")
    def _one_format(self) -> PredictRequest:
        if (self.instances is None) == (self.inputs is None):
            raise ValueError('exactly one of "instances" (rows) or "inputs" (columns) is needed')
        return self


@router.get("/v1/models/{model}")
@router.get("/v1/models/{model}/versions/{version}")
def status(model: str, request: Request, dataplane: CurrentDataPlane) -> dict[str, Any]:
    """Every variant (or the one a version names) is AVAILABLE: a worker serves once all are loaded."""
    pinned = pinned_variant(dataplane.router, model, request.path_params.get("version"))
    names = [v.name for v in dataplane.router.experiment(model).variants if pinned in (None, v.name)]
    return {"model_version_status": [
        {"version": name, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        for name in names]}


@router.post("/v1/models/{model}:predict")
@router.post("/v1/models/{model}/versions/{version}:predict")
async def predict(model: str, request: Request, dataplane: CurrentDataPlane) -> JSONResponse:
    variant = pinned_variant(dataplane.router, model, request.path_params.get("version"))
    body, field, tensor = decode(await request.body())
    rows = dataplane.rows(model, tensor, field)
    if len(rows) != len(tensor):
        raise RequestError(field, f"{len(tensor)} elements that are not rows of the model",
                           f"a list of rows of shape {list(rows.shape[1:])}")
    [answer] = await dataplane.infer("tfserving", [types.InferenceRequest(model, rows, variant=variant)])
    return JSONResponse({"predictions" if field == "instances" else "outputs": encode(answer, body)},
                        headers={"X-Variant": answer.variant})


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
