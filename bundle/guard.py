"""The front door: body size, content type and load shedding, before any parsing.

BentoML's own ``max_concurrency`` answers 429 without ``Retry-After``, and an adaptive batch that
cannot meet ``max_latency_ms`` surfaces as a 503 whose body calls itself "an unexpected error". Here
every refusal is a JSON answer that says what to do: 413 names the limit, 415 the expected type,
and overload is 503 with ``Retry-After``. Shedding happens per worker (the configured limit divided
by the workers, as BentoML divides it), so BentoML's own limit is left off.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

HEALTH_PATHS = frozenset({"/livez", "/readyz", "/metrics", "/healthz", "/v2/health/live", "/v2/health/ready"})
MULTIPART_PATHS = frozenset({"/classify_image"})
PROTOCOL_PREFIXES = ("/v2/models/", "/v1/models/")
"""OIP and TF Serving bodies come with any content type: Triton's client sends none (and binary
tensors after the JSON), TF Serving's documented ``curl -d`` sends a form type; both servers ignore it."""
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class _TooLarge(Exception):
    pass


async def _json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *headers]})
    await send({"type": "http.response.body", "body": payload})


class RequestGuard:
    def __init__(self, app: App, max_body_bytes: int, max_in_flight: int, retry_after_s: int):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_in_flight = max_in_flight
        self.retry_after = str(retry_after_s).encode()
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in HEALTH_PATHS:
            return await self.app(scope, receive, send)
        if scope["method"] in BODY_METHODS:
            refusal = self._check_headers(scope)
            if refusal is not None:
                return await _json(send, *refusal)
        if self.in_flight >= self.max_in_flight:
            return await self._overloaded(send)
        if scope["method"] in BODY_METHODS and scope["path"] in MULTIPART_PATHS:
            checked = await self._checked_form(scope, receive)
            if isinstance(checked, tuple):
                return await _json(send, *checked)
            receive = checked
        self.in_flight += 1
        started, seen = False, 0

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise _TooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] in (429, 503):
                    message = {**message, "headers": [*message.get("headers", []), (b"retry-after", self.retry_after)]}
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except _TooLarge:
            if not started:
                await _json(send, *self._too_large())
        finally:
            self.in_flight -= 1

    def _check_headers(self, scope: Scope) -> tuple[int, dict[str, Any]] | None:
        headers = dict(scope["headers"])
        media = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        expected = "multipart/form-data" if scope["path"] in MULTIPART_PATHS else "application/json"
        if media != expected and not scope["path"].startswith(PROTOCOL_PREFIXES):
            return 415, {"error": f"content-type: {media or 'none'} is not accepted here",
                         "field": "Content-Type", "expected": expected}
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return self._too_large()
        return None

    async def _checked_form(self, scope: Scope, receive: Receive) -> Receive | tuple[int, dict[str, Any]]:
        """Multipart that parses, with the image as a file part, or the 400 that says what is wrong.

        BentoML turns an unparsable form into a 500, and fetches a plain-text ``image`` field as a URL.
        """
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return receive
            chunks.append(message.get("body", b""))
            if sum(map(len, chunks)) > self.max_body_bytes:
                return self._too_large()
            more = message.get("more_body", False)
        body = b"".join(chunks)

        async def replay() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request({k: v for k, v in scope.items() if k != "app"}, replay).form()
        except (MultiPartException, HTTPException) as err:
            return 400, {"error": f"body: not valid multipart/form-data ({getattr(err, 'message', err)})",
                         "field": "body", "expected": "multipart/form-data with a file part named image"}
        try:
            image = form.get("image")
            if image is not None and not isinstance(image, UploadFile):
                return 400, {"error": "image: a plain form field, not a file upload", "field": "image",
                             "expected": 'a file part: Content-Disposition: form-data; name="image"; '
                                         'filename="digit.png"'}
        finally:
            await form.close()
        sent = False

        async def replayed() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replayed

    def _too_large(self) -> tuple[int, dict[str, Any]]:
        return 413, {"error": "body: larger than the limit", "field": "body",
                     "expected": f"at most {self.max_body_bytes} bytes (limits.max_body_bytes)"}

    async def _overloaded(self, send: Send) -> None:
        await _json(send, 503, {"error": "overloaded: retry later", "retry_after_s": int(self.retry_after)},
                    [(b"retry-after", self.retry_after)])
