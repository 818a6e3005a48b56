"""The direct path (``service.direct_path``, on by default): the front door answers the hot inference
routes itself, past what BentoML runs inside its user middlewares: its context middleware, Starlette's
exception middleware and router (a walk of BentoML's routes, whose mount at ``/`` matches the path
against every FastAPI route before it enters), BentoML's API wrapper for ``POST /predict`` and ``/predict_ndarray``, and, for
OIP's infer and TF Serving's predict, the protocols' FastAPI app around their handlers (its middleware
stack, router walk and dependency solving).

Why: with the model call cheap (wine, one row), a request's time is mostly layers that do not change
its answer (docs/performance.md). The guard (``protocols/guard.py``) hands its guarded requests to
:class:`DirectPath`, which answers the hot routes and passes every other request on unchanged.
BentoML's HTTP metrics, tracing and access-log middlewares, and the timeout middleware BentoML builds
(``protocols/timeout.py``'s), run outside the user middlewares (BentoML 1.4's
``ServiceAppFactory.middlewares``), so they see direct answers as they see the others.

The answer is the one the other path gives, from the same code, not from copies:
- ``/predict`` and ``/predict_ndarray``: the body is parsed by the API's input model
  (``Bundle.apis[name].input_spec``) through BentoML's JSON serde, and the answer serialized by the
  API's output model; the body of the API and of the direct path is one function (``native.predict``,
  ``native.predict_ndarray``), its refusals one response (``rest.error_response``, as ``native.error``
  answers them), and BentoML's app adds its own headers (``Server``) to both; a body the input model
  refuses is replayed through BentoML's path, so its 400 (and its log line) is BentoML's own;
- OIP infer and TF Serving predict: the FastAPI route's own handler is called with the path parameters
  the route matched, and its failures answered by ``rest.error_response`` in the flat shape, as the
  route class (``rest.ProtocolRoute``) answers them.

One answer differs: a server fault inside the data plane on those two (a 503 from a full batch
queue, a 500) is answered by ``rest.error_response``, saying what happened, where BentoML's wrapper
says "an unexpected error has occurred". The API's ``bentoml.Context`` is not built
(``native.predict`` does not read it). ``tests/e2e/test_direct.py`` compares both paths.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import bentoml
from _bentoml_impl.serde import JSONSerde, Payload
from bentoml.exceptions import BentoMLException
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from protocols import native
from protocols.guard import App, Receive, Scope, Send, replay
from protocols.rest import error_response
from serving.dataplane import DataPlane

Handler = Callable[[str, Request, DataPlane], Awaitable[Response]]
"""A protocol's inference handler, called as its route calls it: model, request, data plane."""

APIS: dict[str, Callable[[DataPlane, Any], Awaitable[tuple[Any, dict[str, str]]]]] = {
    "predict": lambda dataplane, body: native.predict(dataplane, body.instances),
    "predict_ndarray": lambda dataplane, body: native.predict_ndarray(
        dataplane, body.model, body.inputs, body.user_id, body.variant, body.ids),
}
"""The BentoML APIs the direct path answers, by name (their path is ``/<name>``): the body the API
and the direct path share (``protocols/native.py``), given the API's parsed input."""

class DirectPath:
    """An ASGI app in front of BentoML's stack (``app``) that answers the direct routes itself: the
    BentoML APIs of :data:`APIS`, and the POST routes of ``mounted`` (the protocols' FastAPI app) whose
    handler is one of ``endpoints`` (each a :data:`Handler` that takes no dependency but the data
    plane), by calling that handler."""

    def __init__(self, app: App, mounted: FastAPI | None = None, endpoints: tuple[Handler, ...] = ()):
        self.app = app
        self.routes: list[tuple[re.Pattern[str], Handler]] = [
            (route.path_regex, route.endpoint) for route in iter_route_contexts(mounted.routes if mounted else [])
            if route.endpoint in endpoints and "POST" in (route.methods or ())]
        """The mounted app's direct routes, as path patterns whose groups are the path parameters, and
        their handlers (their POST: the other methods take BentoML's path)."""
        self.service_app: Any = None
        """BentoML's app of the service (``_bentoml_impl``'s ServiceAppFactory), found on the first request."""
        self.serde = JSONSerde()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if (api := scope["path"][1:]) in APIS:
            return await self._api(api, scope, receive, send)
        for path, handler in self.routes:
            if match := path.match(scope["path"]):
                return await self._protocol(handler, {**scope, "path_params": match.groupdict()}, receive, send)
        await self.app(scope, receive, send)

    async def _protocol(self, handler: Handler, scope: Scope, receive: Receive, send: Send) -> None:
        """A protocol's inference route as its route class answers it (``rest.ProtocolRoute``)."""
        if (service := _current_service()) is None:  # not started yet: BentoML's path says so
            return await self.app(scope, receive, send)
        try:
            response = await handler(scope["path_params"]["model"], Request(scope, receive), service.dataplane)
        except ClientDisconnect:  # counted by the guard; nobody is left to answer
            return
        except Exception as err:  # every failure answered, server faults logged, as the route does
            response = error_response(err, flat=True)
        await response(scope, receive, send)

    async def _api(self, name: str, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /<name>`` as the BentoML API ``Bundle.<name>`` answers it."""
        if (service := _current_service()) is None:  # not started yet: BentoML's path says so
            return await self.app(scope, receive, send)
        try:
            body = await Request(scope, receive).body()
        except ClientDisconnect:  # counted by the guard; nobody is left to answer
            return
        if self.service_app is None:
            self.service_app = _service_app(scope)
        api = self.service_app.service.apis[name]
        try:
            parsed = self.serde.deserialize_model(Payload((body,)), api.input_spec)
        except Exception:  # any body the input model refuses: BentoML's own answer (a 400, with its log line)
            return await self.app(scope, replay(body, receive), send)
        try:
            output, headers = await APIS[name](service.dataplane, parsed)
        except Exception as err:  # a refusal as the API answers it; a fault logged, see above
            response = error_response(err)
        else:
            response = await api.output_spec.to_http_response(output, self.serde)
            response.headers.update(headers)
        self.service_app._add_response_headers(response)
        await response(scope, receive, send)


def _current_service() -> Any | None:
    """The worker's service instance, or None while it does not exist yet."""
    try:
        return bentoml.get_current_service()
    except BentoMLException:
        return None


def _service_app(scope: Scope) -> Any:
    """BentoML's app of the service: the owner of the endpoint of its ``predict`` route."""
    route = next(r for r in scope["app"].routes if isinstance(r, Route) and r.name == "predict")
    return route.endpoint.func.__self__
