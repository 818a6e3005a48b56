"""The direct path (``service.direct_path``, off by default): the front door answers ``POST /predict``
itself, past what BentoML runs inside its user middlewares: its context middleware, Starlette's
exception middleware and router (a walk of BentoML's routes) and BentoML's API wrapper. OIP's infer
and TF Serving's predict go straight to the protocols' FastAPI app, past the same context middleware
and router walk (whose mount at ``/`` matches the path against every FastAPI route before it enters).

Why: with the model call cheap (wine, one row), a request's time is mostly layers that do not change
its answer (docs/performance.md). The guard (``protocols/guard.py``) hands its guarded requests to
:class:`DirectPath`, which answers the hot routes and passes every other request on unchanged.
BentoML's HTTP metrics, tracing, access-log and timeout middlewares run outside the user middlewares
(BentoML 1.4's ``ServiceAppFactory.middlewares``), so they see direct answers as they see the others.

The answer is BentoML's, from BentoML's and the API's own code, not from copies:
- the body is parsed by the API's input model (``Bundle.apis["predict"].input_spec``) through
  BentoML's JSON serde, and the answer serialized by the API's output model;
- the body of the API and of the direct path is one function (``native.predict``), its refusals one
  response (``rest.error_response``, as ``native.error`` answers them), and BentoML's app adds its own
  headers (``Server``) to both;
- a body the input model refuses (pydantic's ValidationError) is replayed through BentoML's path, so
  its 400 (and its log line) is BentoML's own: refusals are rare, their second parse does not matter.

One answer differs: a server fault inside the data plane (a 503 from a full batch queue, a 500) is
answered by ``rest.error_response``, saying what happened, where BentoML's wrapper says "an
unexpected error has occurred". The API's ``bentoml.Context`` is not built (``native.predict`` does
not read it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import bentoml
from _bentoml_impl.serde import JSONSerde, Payload
from bentoml.exceptions import BentoMLException
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.routing import Route

from protocols import native
from protocols.guard import NAMED_GROUP, App, Receive, Scope, Send, replay
from protocols.rest import error_response

PREDICT = "/predict"


class DirectPath:
    """An ASGI app in front of BentoML's stack (``app``) that answers the direct routes itself: the
    BentoML API ``/predict``, and the routes of ``mounted`` (the protocols' FastAPI app) whose handler
    is one of ``endpoints``, by the FastAPI app itself (its middlewares, router, the route's
    dependencies, handler and errors as ever) without BentoML's router walk and mount."""

    def __init__(self, app: App, mounted: FastAPI | None = None, endpoints: tuple[Callable[..., Any], ...] = ()):
        self.app = app
        self.mounted = mounted
        routes = iter_route_contexts(mounted.routes if mounted else [])
        self.mounted_path = re.compile("|".join(
            NAMED_GROUP.sub("(?:", route.path_regex.pattern) for route in routes
            if route.endpoint in endpoints and "POST" in (route.methods or ())) or "(?!)").fullmatch
        """The paths of the mounted app's direct routes (their POST: the other methods take BentoML's path)."""
        self.service_app: Any = None
        """BentoML's app of the service (``_bentoml_impl``'s ServiceAppFactory), found on the first request."""
        self.serde = JSONSerde()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if scope["path"] == PREDICT:
            return await self._predict(scope, receive, send)
        if self.mounted_path(scope["path"]):
            return await self.mounted(scope, receive, send)  # type: ignore[misc]
        await self.app(scope, receive, send)

    async def _predict(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /predict`` as the BentoML API ``Bundle.predict`` answers it."""
        try:
            service = bentoml.get_current_service()
        except BentoMLException:  # not started yet: BentoML's path says so
            return await self.app(scope, receive, send)
        try:
            body = await Request(scope, receive).body()
        except ClientDisconnect:  # counted by the guard; nobody is left to answer
            return
        if self.service_app is None:
            self.service_app = _service_app(scope)
        api = self.service_app.service.apis["predict"]
        try:
            instances = self.serde.deserialize_model(Payload((body,)), api.input_spec).instances
        except ValidationError:  # BentoML's own 400
            return await self.app(scope, replay(body, receive), send)
        try:
            rows, headers = await native.predict(service.dataplane, instances)
        except Exception as err:  # a refusal as the API answers it; a fault logged, see above
            response = error_response(err)
        else:
            response = await api.output_spec.to_http_response(rows, self.serde)
            response.headers.update(headers)
        self.service_app._add_response_headers(response)
        await response(scope, receive, send)


def _service_app(scope: Scope) -> Any:
    """BentoML's app of the service: the owner of the endpoint of its ``predict`` route."""
    route = next(r for r in scope["app"].routes if isinstance(r, Route) and r.name == "predict")
    return route.endpoint.func.__self__
