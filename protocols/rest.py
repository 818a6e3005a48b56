"""HTTP, shared by every REST protocol: errors become responses here and nowhere else.

Two body shapes, one mapping:
- the native endpoints and the front door answer ``{"error", "field", "expected"}``;
- the foreign protocols (OIP, TF Serving) answer ``{"error": "..."}`` as their clients expect (never
  FastAPI's 422 shape), with the expected value folded into the message.

The protocol routers also read bodies themselves (OIP's binary extension puts raw bytes after the
JSON) and give the ``{version}`` of their paths one meaning: a variant of the model's A/B experiment.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypeVar

import bentoml
from bentoml.exceptions import BentoMLException
from fastapi import Depends, Request, Response
from starlette.requests import ClientDisconnect
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse

from common.errors import NotFoundError, OverloadedError, RequestError, UnauthorizedError
from common.logs import get_logger
from experiments.router import Router
from serving.dataplane import DataPlane

Body = TypeVar("Body", bound=BaseModel)
CLIENT_CLOSED_REQUEST = 499
"""nginx's status for a request whose client went away first; no client ever reads it."""
log = get_logger("protocols")


def error_response(err: Exception, *, flat: bool = False, headers: dict[str, str] | None = None) -> JSONResponse:
    """The answer to ``err``: a request error's status and body, BentoML's status (a full batch queue is
    its 503), or a 500 whose details stay in the server log. ``flat`` is the foreign protocols' shape."""
    if isinstance(err, (RequestError, OverloadedError)):
        status, body = err.status, err.body()
    elif isinstance(err, BentoMLException):
        status, body = int(err.error_code), {"error": str(err)}
    else:
        log.error("request failed", exc_info=err)
        status, body = 500, {"error": "internal error: see the server log"}
    if flat:
        expected = body.get("expected")
        body = {"error": f"{body['error']} (expected {expected})" if expected else body["error"]}
    if isinstance(err, UnauthorizedError):
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(body, status_code=status, headers=headers)


class ProtocolRoute(APIRoute):
    """A route whose failures reach the client in the foreign protocols' ``{"error": "..."}`` shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handle(request)
            except ClientDisconnect:  # counted by the front door; nobody is left to answer
                log.debug("client disconnected", extra={"path": request.url.path})
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            except Exception as err:  # every failure is answered; error_response logs the server faults
                return error_response(err, flat=True)

        return answer


async def _dataplane() -> DataPlane:
    """Async on purpose: FastAPI runs a sync dependency in its thread pool, a hop per request."""
    return bentoml.get_current_service().dataplane


CurrentDataPlane = Annotated[DataPlane, Depends(_dataplane)]
"""The serving worker's data plane, for the routers of every protocol."""


def parse(body: type[Body], raw: bytes) -> Body:
    """A JSON body as ``body``, or a 400 that says where it is wrong (a malformed body included)."""
    try:
        return body.model_validate_json(raw)
    except ValidationError as err:
        problems = (": ".join(filter(None, (".".join(map(str, e["loc"])), e["msg"]))) for e in err.errors())
        raise RequestError("body", "; ".join(problems)) from None


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
