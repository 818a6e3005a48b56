"""What the foreign REST protocols (bundle/oip.py, bundle/tfserving.py) share over the service.

Both answer every error as ``{"error": "..."}`` with its status, as their clients expect (never
FastAPI's 422 shape), read bodies themselves (OIP's binary extension puts raw bytes after the JSON),
and give the ``{version}`` of their paths one meaning: a variant of the model's A/B experiment.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Protocol, TypeVar

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException
from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse

from bundle.api_models import BatchPrediction
from bundle.errors import NotFoundError, RequestError
from bundle.experiments import LiveExperiments
from bundle.logs import get_logger
from bundle.schema import Schema

Body = TypeVar("Body", bound=BaseModel)
log = get_logger("protocols")


class Service(Protocol):
    """What the protocol routers use of ``service.Bundle``: its inference path and its catalogue."""

    live: LiveExperiments

    async def infer(self, endpoint: str, model: str, rows: np.ndarray, user_id: str | None = None,
                    variant: str | None = None) -> BatchPrediction: ...

    def schema(self, model: str) -> Schema: ...

    def rows(self, model: str, inputs: Any, field: str) -> np.ndarray: ...

    def models(self) -> dict[str, Any]: ...


CurrentService = Annotated[Service, Depends(bentoml.get_current_service)]


class ProtocolRoute(APIRoute):
    """A route whose failures reach the client as ``{"error": "..."}``: a bad request (400), an unknown
    model or version (404), too many rows (413), a full batch queue (BentoML's 503)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handle(request)
            except RequestError as err:
                message, status = f"{err} (expected {err.expected})" if err.expected else str(err), err.status
            except BentoMLException as err:
                message, status = str(err), int(err.error_code)
            except Exception:  # a server fault: logged with its traceback, answered in the protocol's shape
                log.exception("protocol request failed", extra={"path": request.url.path})
                message, status = "internal error: see the server log", 500
            return JSONResponse({"error": message}, status_code=status)

        return answer


def parse(body: type[Body], raw: bytes) -> Body:
    """A JSON body as ``body``, or a 400 that says where it is wrong (a malformed body included)."""
    try:
        return body.model_validate_json(raw)
    except ValidationError as err:
        problems = (": ".join(filter(None, (".".join(map(str, e["loc"])), e["msg"]))) for e in err.errors())
        raise RequestError("body", "; ".join(problems)) from None


def pinned_variant(svc: Service, model: str, version: str | None) -> str | None:
    """The variant a ``{version}`` path segment pins (None without one: the A/B split decides).

    A version is a variant's name, else the first variant whose model tag has that version (``v2``,
    or ``2`` as TF Serving and Triton clients write versions). An unknown model or version is a 404,
    raised before the body is read.
    """
    variants = svc.live.router.experiment(model).variants
    if version is None:
        return None
    chosen = next((v for v in variants if v.name == version), None) or next(
        (v for v in variants if v.model.partition(":")[2] in (version, f"v{version}")), None)
    if chosen is None:
        known = ", ".join(f"{v.name} ({v.model})" for v in variants)
        raise NotFoundError("version", f"unknown version {version!r} of {model!r}",
                            f"a variant name or its model's version: {known}")
    return chosen.name
