"""Issue: performance. ``protocols/timeout.py``: BentoML builds our deadline in place of its timeout
middleware, which keeps BentoML's contract (504 when no answer started in time; a started answer is
never cut) and leaves no timer behind a request that was answered.
"""

from __future__ import annotations

import asyncio
import gc
import json
from typing import Any

import pytest
from bentoml._internal.server.base_app import BaseAppFactory
from bentoml._internal.server.http.traffic import TimeoutMiddleware

from protocols import timeout
from protocols.timeout import Deadline

REQUESTS = 500


class _Factory(BaseAppFactory):
    name = "timeout-test"


def _scope() -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": "/", "headers": []}


async def _call(middleware: Any) -> list[dict[str, Any]]:
    """One request through ``middleware``; the messages it sends."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await middleware(_scope(), receive, send)
    return sent


async def _answer(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _armed_timers() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, asyncio.TimerHandle) and not o.cancelled())


def test_bentoml_builds_the_deadline_in_place_of_its_timeout_middleware() -> None:
    timeout.install()
    [middleware] = _Factory(timeout=7.5).middlewares
    assert middleware.cls is Deadline and middleware.kwargs == {"timeout": 7.5}


@pytest.mark.parametrize("middleware, left", [(Deadline, 0), (TimeoutMiddleware, REQUESTS)])
def test_answered_requests_leave_no_timer_armed_where_bentomls_left_one_each(middleware: type, left: int) -> None:
    """The cost this replaces: BentoML's middleware leaves every answered request's timer armed for
    the whole timeout, with what it holds; the deadline disarms it when the answer starts."""
    async def run() -> int:
        app = middleware(_answer, timeout=30)
        before = _armed_timers()
        for _ in range(REQUESTS):
            assert [m["type"] for m in await _call(app)] == ["http.response.start", "http.response.body"]
        return _armed_timers() - before

    assert asyncio.run(run()) == left


def test_no_answer_in_time_is_cancelled_and_answered_504() -> None:
    cancelled = []

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    sent = asyncio.run(_call(Deadline(slow, timeout=0.05)))
    assert sent[0]["status"] == timeout.TIMED_OUT and cancelled == [True]
    assert json.loads(sent[1]["body"]) == {"error": "no answer started within service.timeout_s (0.05 s)"}


def test_an_answer_started_in_time_is_not_cut() -> None:
    async def streaming(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(0.15)
        await send({"type": "http.response.body", "body": b"late but whole"})

    sent = asyncio.run(_call(Deadline(streaming, timeout=0.05)))
    assert [m.get("status") for m in sent] == [200, None] and sent[1]["body"] == b"late but whole"


def test_an_apps_own_timeout_error_is_not_turned_into_a_504() -> None:
    async def failing(scope: Any, receive: Any, send: Any) -> None:
        raise TimeoutError("the store did not answer")

    with pytest.raises(TimeoutError, match="the store"):
        asyncio.run(_call(Deadline(failing, timeout=30)))
