"""The HTTP front door: body size, content type and load shedding, before any parsing.

BentoML's own ``max_concurrency`` answers 429 without ``Retry-After``, and an adaptive batch that
cannot meet ``max_latency_ms`` surfaces as a 503 whose body calls itself "an unexpected error". Here
every refusal is a JSON answer that says what to do: 413 names the limit, 415 the expected type,
and overload is 503 with ``Retry-After``. Shedding happens per worker (the configured limit divided
by the workers, as BentoML divides it), so BentoML's own limit is left off. When API keys or rate
limits are on (``protocols/access.py``), an inference request without a valid key is a 401 and one
over its caller's limit a 429 with ``Retry-After``, before anything else is checked.

A protected route (a bearer token, ``protocols/auth.py``) answers 401/403 before anything else too: a
caller without a token must not learn which content type or size the route takes. Its header checks
are kept for the first read of its body, which the route makes only once the token passed
(``protected_routes``).

The guard knows no protocol: each protocol module declares its paths' needs as a :class:`Paths`, and
the service hands the guard their union.

Every request it lets through gets an id, answered as ``X-Request-Id`` and named in the log of any
server error it meets (BentoML's own request id comes from its tracing, off by default for speed).
Every answer, probes and refusals included, names the replica that gave it as ``X-Replica-Id``
(``common.ids.replica_id``), so a request through a load balancer can be traced to its replica.

Kept-alive connections are aged (``service.max_connection_age_s``, :class:`ConnectionAges`): BentoML's
workers share one listening socket, and a connection stays on the worker that accepted it, so the
first answer past a connection's age asks the client to reconnect, to whichever worker has room.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse

from common.errors import OverloadedError, RequestError, TooLargeError, UnsupportedMediaError
from common.ids import Ids, replica_id
from common.logs import REQUEST_ID
from common.metrics import DISCONNECTS
from protocols.access import Access
from protocols.auth import Bearer
from protocols.rest import error_response, health

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

READINESS = "/readyz"
"""BentoML's readiness probe, answered here with the worker's health report."""
SERVER_PROBES = frozenset({"/livez", READINESS, "/metrics", "/healthz"})
"""BentoML's own probes and metrics: never shed, never checked."""
JSON = "application/json"
MULTIPART = "multipart/form-data"
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
CLOSE = (b"connection", b"close")
"""Asks uvicorn to close the connection once the answer is sent (the client reconnects)."""
AGE_JITTER = 0.2
"""Each connection's age is drawn within this share around ``service.max_connection_age_s``."""
NAMED_GROUP = re.compile(r"\(\?P<\w+>")
"""A route's parameter in Starlette's pattern of its path: unnamed, so that many patterns join in one."""


@dataclass(frozen=True)
class Paths:
    """What one protocol tells the front door about its routes."""

    probes: frozenset[str] = frozenset()
    """Health routes: never shed, never checked."""
    multipart: frozenset[str] = frozenset()
    """Routes whose body is a form with an image file part (checked here: BentoML answers 500 to a
    malformed form and fetches a plain-text ``image`` field as a URL)."""
    any_media: tuple[str, ...] = ()
    """Path prefixes whose clients send any content type (or none); every other body must be JSON."""
    fixed: frozenset[str] = frozenset()
    """Routes without path parameters, named as they are in the front door's metrics."""
    inference: tuple[str, ...] = ()
    """Inference routes, as regular expressions of the whole path: with API keys or rate limits on,
    each request needs a key and a token (``protocols/access.py``); probes and control routes never."""
    protected: tuple[str, ...] = ()
    """Routes that check a bearer token before they read the body, as regular expressions of
    ``"METHOD /path"`` (:func:`protected_routes`)."""

    @classmethod
    def union(cls, *each: Paths) -> Paths:
        return cls(probes=frozenset().union(*(p.probes for p in each)),
                   multipart=frozenset().union(*(p.multipart for p in each)),
                   any_media=tuple(prefix for p in each for prefix in p.any_media),
                   fixed=frozenset().union(*(p.fixed for p in each)),
                   inference=tuple(pattern for p in each for pattern in p.inference),
                   protected=tuple(pattern for p in each for pattern in p.protected))

    def label(self, path: str) -> str:
        """A bounded name for ``path`` in metrics: a fixed route, its protocol's prefix, or ``other``.
        Raw paths carry model names and anything a client types: one series each would be unbounded."""
        if path in self.fixed or path in self.multipart:
            return path
        return next((f"{prefix}*" for prefix in self.any_media if path.startswith(prefix)), "other")


def protected_routes(app: FastAPI) -> Paths:
    """The routes of ``app`` that take a bearer token (a :class:`protocols.auth.Bearer` dependency)."""
    return Paths(protected=tuple(
        f"(?:{'|'.join(sorted(route.methods))}) {NAMED_GROUP.sub('(?:', route.path_regex.pattern[1:-1])}"
        for route in iter_route_contexts(app.routes)
        if isinstance(route.original_route, APIRoute)
        and any(isinstance(d.call, Bearer) for d in route.dependant.dependencies)))


def replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` giving ``body`` again, whole, then what the client sends next (its hang-up)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


class _TooLarge(Exception):
    pass


class ConnectionAges:
    """When each client connection of this worker is due to close, to close the ones older than
    ``max_age_s`` (``service.max_connection_age_s``). ASGI gives no connection object, so a connection
    is its peer address, unique among open connections."""

    def __init__(self, max_age_s: float | None):
        self.max_age_s = max_age_s
        self.due: dict[tuple[str, int], float] = {}
        self.pruned_at = time.monotonic()

    def expired(self, client: tuple[str, int] | None) -> bool:
        """True once for a connection past its age (it is then forgotten: the client reconnects)."""
        if self.max_age_s is None or client is None:
            return False
        now = time.monotonic()
        if now - self.pruned_at > self.max_age_s:
            # Connections closed by their clients are never seen again: dropping the entries due more
            # than an age ago bounds the table. A live connection among them was idle for that long
            # (one with a request in between was closed); it starts counting again, and closes later.
            self.due = {peer: due for peer, due in self.due.items() if now - due <= self.max_age_s}
            self.pruned_at = now
        due = self.due.get(client)
        if due is None:
            # Jittered: connections opened together (a pool, a load generator) would otherwise all
            # reconnect in the same instant, and one worker waiting in epoll could accept them all again.
            self.due[client] = now + self.max_age_s * random.uniform(1 - AGE_JITTER, 1 + AGE_JITTER)
            return False
        if now < due:
            return False
        del self.due[client]
        return True


class RequestGuard:
    def __init__(self, app: App, paths: Paths, max_body_bytes: int, max_in_flight: int, retry_after_s: int,
                 access: Access, max_connection_age_s: float | None = None,
                 direct: Callable[[App], App] | None = None):
        self.app = app
        self.inner = app if direct is None else direct(app)
        """What a guarded request goes to: BentoML's stack, or the direct path in front of it
        (``service.direct_path``, ``protocols/direct.py``)."""
        self.paths = paths
        self.access = access
        self.inference = re.compile("|".join(paths.inference)).fullmatch
        self.protected = re.compile("|".join(paths.protected) or "(?!)").fullmatch
        self.unchecked = SERVER_PROBES | paths.probes
        self.multipart = paths.multipart
        self.any_media = paths.any_media
        self.max_body_bytes = max_body_bytes
        self.max_in_flight = max_in_flight
        self.retry_after_s = retry_after_s
        self.retry_after = str(retry_after_s).encode()
        self.in_flight = 0
        self.ages = ConnectionAges(max_connection_age_s)
        self.request_ids = Ids(separator="-")
        self.replica_header = (b"x-replica-id", replica_id().encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] == READINESS:
            return await self._readiness(scope, receive, self._stamped(send))
        if scope["path"] in self.unchecked:
            return await self.app(scope, receive, self._stamped(send))
        try:
            await self._guarded(scope, receive, send)
        except (RequestError, OverloadedError) as refusal:
            headers = {"Retry-After": str(self.retry_after_s)} if isinstance(refusal, OverloadedError) else None
            await error_response(refusal, headers=headers)(scope, receive, self._stamped(send))

    def _stamped(self, send: Send) -> Send:
        """``send`` adding ``X-Replica-Id`` to the answer (the guarded path adds it beside the request id)."""
        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.replica_header]}
            await send(message)
        return stamped

    async def _readiness(self, scope: Scope, receive: Receive, send: Send) -> None:
        """BentoML's ``/readyz`` with the worker's health report as its JSON body: 200 when ready, 503
        when not (``DataPlane.health`` says which checks decide). BentoML's own probe answers while
        the service instance does not exist yet."""
        report = health()
        if report is None:
            return await self.app(scope, receive, send)
        status = HTTPStatus.OK if report["ready"] else HTTPStatus.SERVICE_UNAVAILABLE
        await JSONResponse(report, status_code=status)(scope, receive, send)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.access.active and self.inference(scope["path"]):  # off: this attribute check is all
            self.access.admit(scope)
        refusal = self._refusal(scope) if scope["method"] in BODY_METHODS else None
        if refusal is not None and not self.protected(f"{scope['method']} {scope['path']}"):
            raise refusal
        if self.in_flight >= self.max_in_flight:
            raise OverloadedError(self.retry_after_s)
        if refusal is None and scope["method"] in BODY_METHODS and scope["path"] in self.multipart:
            checked = await self._checked_form(scope, receive)
            if checked is None:
                return
            receive = checked
        self.in_flight += 1
        started, seen = False, 0
        request_id = self.request_ids.next()
        REQUEST_ID.set(request_id)  # this request's task and what it starts; the next request sets its own
        request_header = (b"x-request-id", request_id.encode())

        async def counted_receive() -> Message:
            nonlocal seen
            if refusal is not None:  # a protected route reads its body only once its token passed
                raise refusal
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise _TooLarge
            elif message["type"] == "http.disconnect" and not started:
                DISCONNECTS.labels(path=self.paths.label(scope["path"])).inc()  # a client's choice, not a fault
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [*message.get("headers", []), request_header, self.replica_header]
                if message["status"] in (429, 503):
                    headers.append((b"retry-after", self.retry_after))
                if self.ages.expired(scope.get("client")):
                    headers.append(CLOSE)
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.inner(scope, counted_receive, guarded_send)
        except _TooLarge:
            if not started:
                raise self._too_large() from None
        finally:
            self.in_flight -= 1

    def _refusal(self, scope: Scope) -> RequestError | None:
        """The 415 or 413 that the request's headers earn, if any."""
        headers = dict(scope["headers"])
        media = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        expected = MULTIPART if scope["path"] in self.multipart else JSON
        if media != expected and not scope["path"].startswith(self.any_media):
            return UnsupportedMediaError("Content-Type", f"{media or 'none'} is not accepted here", expected)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return self._too_large()
        return None

    async def _checked_form(self, scope: Scope, receive: Receive) -> Receive | None:
        """The body replayed once it parses as a form with the image as a file part, or the 400 that
        says what is wrong; None when the client hung up (counted: nobody is left to answer)."""
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                DISCONNECTS.labels(path=self.paths.label(scope["path"])).inc()
                return None
            if message["type"] != "http.request":
                return receive
            chunks.append(message.get("body", b""))
            if sum(map(len, chunks)) > self.max_body_bytes:
                raise self._too_large()
            more = message.get("more_body", False)
        body = b"".join(chunks)

        async def whole() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request({k: v for k, v in scope.items() if k != "app"}, whole).form()
        except (MultiPartException, HTTPException) as err:
            raise RequestError("body", f"not valid multipart/form-data ({getattr(err, 'message', err)})",
                               "multipart/form-data with a file part named image") from None
        try:
            image = form.get("image")
            if image is not None and not isinstance(image, UploadFile):
                raise RequestError("image", "a plain form field, not a file upload",
                                   'a file part: Content-Disposition: form-data; name="image"; filename="digit.png"')
        finally:
            await form.close()
        return replay(body, receive)

    def _too_large(self) -> TooLargeError:
        return TooLargeError("body", "larger than the limit",
                             f"at most {self.max_body_bytes} bytes (limits.max_body_bytes)")
