"""HTTP, shared by every REST protocol: errors become responses here and nowhere else.

Two body shapes, one mapping:
- the native endpoints and the front door answer ``{"error", "field", "expected"}``;
- the foreign protocols (OIP, TF Serving) answer ``{"error": "..."}`` as their clients expect (never
  FastAPI's 422 shape), with the expected value folded into the message.

Routers read bodies themselves (``read_json``), after their dependencies: OIP's binary extension
puts raw bytes after the JSON, and a protected route checks its token (``protocols/auth.py``) before
anything looks at the body. ``openapi_body`` puts such a body in the OpenAPI document all the same, and
the route classes document the error answers. The ``{version}`` of the protocols' paths has one
meaning: a variant of the model's A/B experiment.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any, ClassVar, NotRequired, TypeVar

import bentoml
from bentoml.exceptions import BentoMLException
from fastapi import Depends, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from pydantic_core import to_json
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse
from typing_extensions import TypedDict

from common.errors import NotFoundError, OverloadedError, RateLimitedError, RequestError, UnauthorizedError
from common.logs import get_logger
from experiments.router import Router
from experiments.store import StoreUnavailable
from serving.dataplane import DataPlane
from serving.types import BatchPrediction

Body = TypeVar("Body", bound=BaseModel)
JSON = "application/json"
CLIENT_CLOSED_REQUEST = 499
"""nginx's status for a request whose client went away first; no client ever reads it."""
log = get_logger("protocols")


def json_bytes(content: Any) -> bytes:
    """Compact JSON by pydantic-core's serializer, as BentoML renders ``/predict``'s answers: 1 us for an
    OIP answer where the standard library's ``json`` (starlette's ``JSONResponse``) took 6. The same
    bytes, but a NaN or infinity is ``null``, as in ``/predict``'s answers, where ``json`` refused it."""
    return to_json(content, inf_nan_mode="null")


class JSONAnswer(JSONResponse):
    """A JSON answer rendered by :func:`json_bytes`."""

    def render(self, content: Any) -> bytes:
        return json_bytes(content)


def error_response(err: Exception, *, flat: bool = False, headers: dict[str, str] | None = None) -> JSONResponse:
    """The answer to ``err``: a request error's status and body, BentoML's status (a full batch queue is
    its 503), or a 500 whose details stay in the server log. ``flat`` is the foreign protocols' shape."""
    if isinstance(err, RequestValidationError):  # a query, path or header parameter FastAPI checked
        problems = err.errors()
        err = RequestError(str(problems[0]["loc"][-1]), "; ".join(p["msg"] for p in problems))
    if isinstance(err, (RequestError, OverloadedError, StoreUnavailable)):
        status, body = err.status, err.body()
    elif isinstance(err, BentoMLException):
        status, body = int(err.error_code), {"error": str(err)}
    else:
        log.error("request failed", exc_info=err)
        status, body = 500, {"error": "internal error: see the server log"}
    if flat:
        body = {"error": flat_message(body)}
    if isinstance(err, UnauthorizedError):
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    if isinstance(err, RateLimitedError):
        headers = {**(headers or {}), "Retry-After": str(err.retry_after_s)}
    return JSONResponse(body, status_code=status, headers=headers)


def flat_message(body: dict[str, Any]) -> str:
    """An error body as one message, the expected value folded in (the foreign protocols, gRPC's)."""
    expected = body.get("expected")
    folded = expected and expected not in body["error"]  # a shape error already says what fits
    return f"{body['error']} (expected {expected})" if folded else body["error"]


class ErrorBody(TypedDict):
    """A refusal in the native shape."""

    error: Annotated[str, Field(description="what is wrong, after the name of the field at fault")]
    field: Annotated[str, Field(description="the part at fault: a body field, a header, a path parameter")]
    expected: NotRequired[Annotated[str, Field(description="what would have been accepted")]]


class FlatErrorBody(TypedDict):
    """A refusal in the foreign protocols' shape (the front door's refusals add the native fields)."""

    error: Annotated[str, Field(description="what is wrong and what was expected")]


class UnavailableBody(TypedDict):
    """The front door's overload (with retry_after_s), or a model that failed to load (with field)."""

    error: str
    retry_after_s: NotRequired[Annotated[int, Field(description="the same as the Retry-After header")]]


def error_responses(flat: bool, *others: type) -> dict[int | str, dict[str, Any]]:
    """The documented refusals of a route: its 4xx in its shape (or one of ``others``), and the 503
    (with ``Retry-After``, which the front door adds to every 503). Always JSON, whatever the route
    answers when it succeeds (an HTML page), so the schemas are given, not FastAPI ``model`` entries
    (which take the route's media type)."""
    shapes = [TypeAdapter(shape).json_schema()
              for shape in (FlatErrorBody if flat else ErrorBody, *others)]
    return {
        "4XX": {"description": "refused: 400 malformed or invalid input, 401/403 missing or wrong token, 404 "
                               "unknown model or version, 413 body too large, 415 wrong content type, 429 over "
                               "the rate limit",
                "content": {JSON: {"schema": {"anyOf": shapes} if others else shapes[0]}}},
        OverloadedError.status: {
            "description": "overloaded, or the model is not loaded",
            "content": {JSON: {"schema": TypeAdapter(UnavailableBody).json_schema()}},
            "headers": {"Retry-After": {"description": "seconds to wait before retrying", "required": True,
                                        "schema": {"type": "integer"}}}},
    }


class NativeRoute(APIRoute):
    """A route whose failures, its dependencies' included, reach the client through
    :func:`error_response` in the native ``{"error", "field", "expected"}`` shape, and whose document
    lists them."""

    flat: ClassVar[bool] = False

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        kwargs["responses"] = {**error_responses(self.flat), **(kwargs.get("responses") or {})}
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handle(request)
            except ClientDisconnect:  # counted by the front door; nobody is left to answer
                log.debug("client disconnected", extra={"path": request.url.path})
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            except Exception as err:  # every failure is answered; error_response logs the server faults
                return error_response(err, flat=self.flat)

        return answer


class ProtocolRoute(NativeRoute):
    """A route whose failures reach the client in the foreign protocols' ``{"error": "..."}`` shape."""

    flat = True


async def _dataplane() -> DataPlane:
    """Async on purpose: FastAPI runs a sync dependency in its thread pool, a hop per request."""
    return bentoml.get_current_service().dataplane


CurrentDataPlane = Annotated[DataPlane, Depends(_dataplane)]
"""The serving worker's data plane, for the routers of every protocol."""


def health() -> dict[str, Any] | None:
    """The serving worker's readiness report (``DataPlane.health``), or None while its service
    instance does not exist yet."""
    try:
        service = bentoml.get_current_service()
    except BentoMLException:
        return None
    return service.dataplane.health()


def parse(body: type[Body], raw: bytes) -> Body:
    """A JSON body as ``body``, or a 400 that says where it is wrong (a malformed body included)."""
    try:
        return body.model_validate_json(raw)
    except ValidationError as err:
        raise RequestError("body", describe(err)) from None


def describe(err: ValidationError) -> str:
    """Every problem pydantic found, each after the path of the field it is in."""
    return "; ".join(": ".join(filter(None, (".".join(map(str, e["loc"])), e["msg"]))) for e in err.errors())


async def read_json(request: Request, body: type[Body]) -> Body:
    """The request's JSON body as ``body``, read once the route's dependencies (its token) have passed;
    a 400 naming the field otherwise. Document it with ``openapi_extra=openapi_body(body)``."""
    return parse(body, await request.body())


def openapi_body(body: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` that documents ``body`` as the required JSON body of a route that reads it
    itself (:func:`read_json`). The schema is inlined: ``openapi_extra`` cannot add components."""
    schema = body.model_json_schema()
    schema = _inline(schema, schema.pop("$defs", {}))
    return {"requestBody": {"required": True, "content": {JSON: {"schema": schema}}}}


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    """``schema`` with every ``$ref`` to ``defs`` replaced by its definition (no model here is recursive)."""
    if isinstance(schema, list):
        return [_inline(item, defs) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        reference = schema["$ref"].rpartition("/")[2]
        schema = {**defs[reference], **{k: v for k, v in schema.items() if k != "$ref"}}
    return {key: _inline(value, defs) for key, value in schema.items()}


def answers(model: type[BaseModel]) -> dict[str, Any]:
    """Route arguments that document ``model`` as the 200 answer of a handler that builds its answer
    itself (as a dict, or a response with headers), without validating answers against it at runtime."""
    return {"response_model": None, "responses": {200: {"model": model}}}


def _version(version: Annotated[str, Path(description="a variant's name, or its model's version: v2, or 2")],
             ) -> None:
    """Declares the ``{version}`` path parameter for the document: one handler serves the path with and
    without it, and reads it from ``request.path_params``."""


VERSIONED = [Depends(_version)]
"""The ``dependencies`` of a protocol route whose path pins a version."""


def pinned_variant(router: Router, model: str, version: str | None) -> str | None:
    """The variant a ``{version}`` path segment pins (None without one: the A/B split decides).

    A version is a variant's name, else the first variant whose model tag has that version (``v2``,
    or ``2`` as TF Serving and Triton clients write versions). An unknown model or version is a 404,
    raised before the body is read.
    """
    variants = router.experiment(model).variants
    if version is None:
        return None
    chosen = next((v for v in variants if v.name == version), None) or next(
        (v for v in variants if v.model.partition(":")[2] in (version, f"v{version}")), None)
    if chosen is None:
        known = ", ".join(f"{v.name} ({v.model})" for v in variants)
        raise NotFoundError("version", f"unknown version {version!r} of {model!r}",
                            f"a variant name or its model's version: {known}")
    return chosen.name


def client_ids(ids: list[str] | None, rows: int, field: str) -> tuple[str, ...] | None:
    """The client's own ids, one per row, or the 400 that says how many were expected."""
    if ids is not None and len(ids) != rows:
        raise RequestError(field, f"{len(ids)} ids for {rows} rows", f"{rows} ids, one per row, or none")
    return None if ids is None else tuple(ids)


def headers(answer: BatchPrediction) -> dict[str, str]:
    """``X-Variant``, and ``X-Prediction-Id`` when the answer is one prediction."""
    one = {"X-Prediction-Id": answer.prediction_ids[0]} if len(answer.prediction_ids) == 1 else {}
    return {"X-Variant": answer.variant, **one}
