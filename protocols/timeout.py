"""BentoML's request timeout (``service.timeout_s``), without what it cost every request.

BentoML's ``TimeoutMiddleware`` (``bentoml/_internal/server/http/traffic.py``) runs each request in a
task of its own and arms a timer with ``loop.call_later`` that it never cancels: every answered request
leaves a timer, a future and a context alive for ``timeout_s`` (30 s: ~50,000 a worker at saturation),
and the garbage collector walks them until they fire. ``Deadline`` keeps its contract (no answer started
within ``timeout_s``: the request is cancelled and answered 504, its body naming the setting; an answer
that has started is never cut) in the request's own task, and drops its timer as soon as the answer starts.

BentoML builds its middleware list from that module's attribute when a worker makes its app, so
``install`` puts ``Deadline`` there. ``tests/unit/test_timeout.py`` builds BentoML's list and says
when an upgrade moves it.
"""

from __future__ import annotations

import asyncio

from bentoml._internal.server.http import traffic
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TIMED_OUT = 504


class Deadline:
    """ASGI middleware: ``app``'s answer must start within ``timeout`` seconds."""

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        started = False

        async def started_send(message: Message) -> None:
            nonlocal started
            if not started:
                started = True
                deadline.reschedule(None)  # the answer has begun: its timer goes, nothing cuts it
            await send(message)

        try:
            async with asyncio.timeout(self.timeout) as deadline:
                await self.app(scope, receive, started_send)
        except TimeoutError:
            if started or not deadline.expired():  # the app's own TimeoutError is the app's fault
                raise
            body = {"error": f"no answer started within service.timeout_s ({self.timeout:g} s)"}
            await JSONResponse(body, status_code=TIMED_OUT)(scope, receive, send)


def install() -> None:
    """BentoML's workers build ``Deadline`` where they would build their ``TimeoutMiddleware``."""
    setattr(traffic, "TimeoutMiddleware", Deadline)
