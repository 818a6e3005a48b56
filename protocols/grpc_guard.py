"""The front door and the error mapping of every gRPC service (``protocols/grpc_server.py``).

What the HTTP front door does (``protocols/guard.py``), :class:`Guard` does for every RPC: API keys and
rate limits on inference calls (``protocols/access.py``), load shedding, a request id, the admin token
of the calls that change state (REST's ``AdminAuth``, ``protocols/auth.py``); and
:func:`status` maps the protocol-free errors (``common/errors.py``) to gRPC status codes, once for
every service.
"""

from __future__ import annotations

import functools
import itertools
import secrets
from dataclasses import dataclass
from typing import Any, TypeVar
from collections.abc import Awaitable, Callable

import grpc
from bentoml.exceptions import BentoMLException, ServiceUnavailable
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from starlette.requests import Request

from common.errors import OverloadedError, RateLimitedError, RequestError
from common.logs import REQUEST_ID, get_logger
from experiments.store import StoreUnavailable
from protocols.access import Access
from protocols.auth import AdminAuth
from protocols.grpc_h2 import Context
from protocols.rest import flat_message

log = get_logger("grpc")
Servicer = TypeVar("Servicer")
Reply = TypeVar("Reply")

CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
         409: grpc.StatusCode.FAILED_PRECONDITION, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
         415: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
         503: grpc.StatusCode.UNAVAILABLE}
"""A request error's HTTP status as a gRPC code. 409 (the call contradicts the state it would change:
an unload of a model a variant still routes to) is FAILED_PRECONDITION, which a retry does not cure.
413 (more rows than ``limits.max_rows``) is RESOURCE_EXHAUSTED like grpc's own answer to a message
over the size limit."""
RETRY_AFTER = "retry-after"
"""Trailing metadata of every RESOURCE_EXHAUSTED that a retry cures: whole seconds, as HTTP's header;
the same wait is in ``google.rpc.RetryInfo`` in the rich status (``grpc-status-details-bin``)."""
USER_ID = "user-id"
"""Metadata that makes the A/B assignment sticky (OIP's ``user_id`` parameter wins over it)."""
PEER_PREFIXES = ("ipv4:", "ipv6:", "unix:")
ADMIN: Callable[[Request], Awaitable[Any]] = AdminAuth.dependency  # type: ignore[assignment]
"""REST's admin token check itself, given the RPC's metadata as an HTTP request's headers."""


@dataclass(frozen=True)
class Refusal:
    """What a failed RPC answers: its code, a message as clear as REST's, and the seconds after which a
    retry may succeed (overload and rate limits)."""

    code: grpc.StatusCode
    message: str
    retry_after_s: int | None = None

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        if self.retry_after_s is None:
            return ()
        detail = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=self.retry_after_s))
        rich = status_pb2.Status(code=getattr(code_pb2, self.code.name), message=self.message)
        rich.details.add().Pack(detail)
        return (*rpc_status.to_status(rich).trailing_metadata, (RETRY_AFTER, str(self.retry_after_s)))


def status(err: Exception, retry_after_s: int) -> Refusal:
    """The one mapping of errors to gRPC status codes: the request's own errors by their HTTP status,
    overload (the front door's or a full batch queue's) as RESOURCE_EXHAUSTED with the wait, an
    unreachable store as UNAVAILABLE, anything else INTERNAL with its details in the server log."""
    if isinstance(err, RequestError):
        wait = err.retry_after_s if isinstance(err, RateLimitedError) else None
        return Refusal(CODES.get(err.status, grpc.StatusCode.INVALID_ARGUMENT), flat_message(err.body()), wait)
    if isinstance(err, OverloadedError):
        return Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err), err.retry_after_s)
    if isinstance(err, ServiceUnavailable):  # the batch queue cannot meet max_latency_ms
        return Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err), retry_after_s)
    if isinstance(err, StoreUnavailable):
        return Refusal(grpc.StatusCode.UNAVAILABLE, str(err))
    if isinstance(err, BentoMLException):
        return Refusal(CODES.get(int(err.error_code), grpc.StatusCode.INTERNAL), str(err))
    log.error("request failed", exc_info=err)
    return Refusal(grpc.StatusCode.INTERNAL, "internal error: see the server log")


def metadata(context: Context) -> dict[str, str | bytes]:
    return {key: value for key, value in context.invocation_metadata() or ()}


def user_id(context: Context) -> str | None:
    value = metadata(context).get(USER_ID)
    return value if isinstance(value, str) else None


class Guard:
    """The front door of every RPC: keys and limits (inference only), shedding, a request id, errors."""

    def __init__(self, access: Access, max_in_flight: int, retry_after_s: int):
        self.access = access
        self.max_in_flight = max_in_flight
        """Inference RPCs in flight in this worker, as many as its HTTP front door takes (each counts
        its own)."""
        self.retry_after_s = retry_after_s
        self.in_flight = 0
        self.id_prefix = f"g{secrets.token_hex(6)}"
        self.id_counter = itertools.count()

    async def call(self, handler: Callable[[Any, Any], Awaitable[Reply]], request: Any,
                   context: Context, inference: bool, admin: bool = False) -> Reply:
        try:
            if admin:  # the token before anything reads the request
                await ADMIN(Request({"type": "http", **self._scope(context)}))
            if not inference:
                return await handler(request, context)
            if self.access.active:
                self.access.admit(self._scope(context))
            if self.in_flight >= self.max_in_flight:
                raise OverloadedError(self.retry_after_s)
            REQUEST_ID.set(f"{self.id_prefix}-{next(self.id_counter):x}")
            self.in_flight += 1
            try:
                return await handler(request, context)
            finally:
                self.in_flight -= 1
        except grpc.aio.AbortError:  # a handler's own abort, already answered
            raise
        except Exception as err:  # every failure is answered with its code
            refusal = status(err, self.retry_after_s)
            await context.abort(refusal.code, refusal.message, refusal.trailing_metadata())
            raise AssertionError("unreachable: context.abort raises") from err

    @staticmethod
    def _scope(context: Context) -> dict[str, Any]:
        """What ``Access.admit`` reads of an HTTP request (headers, client address), from the RPC's
        metadata and peer: keys travel as ``x-api-key`` or ``authorization: Bearer`` metadata."""
        headers = [(key.encode(), value if isinstance(value, bytes) else value.encode())
                   for key, value in context.invocation_metadata() or ()]
        peer = context.peer() or ""
        address = next((peer[len(p):] for p in PEER_PREFIXES if peer.startswith(p)), peer).rpartition(":")[0]
        return {"headers": headers, "client": (address.strip("[]"),)}


def rpc(inference: bool = False, admin: bool = False,
        ) -> Callable[[Callable[[Servicer, Any, Any], Awaitable[Reply]]],
                      Callable[[Servicer, Any, Any], Awaitable[Reply]]]:
    """A servicer method behind its servicer's :class:`Guard` (``self.guard``); ``inference`` methods
    are checked for keys and limits and shed under overload; ``admin`` methods take the admin token as
    ``authorization: Bearer <token>`` metadata (UNAUTHENTICATED without it, PERMISSION_DENIED when
    the server has none)."""
    def wrap(method: Callable[[Servicer, Any, Any], Awaitable[Reply]]) -> Callable[[Servicer, Any, Any],
                                                                                  Awaitable[Reply]]:
        @functools.wraps(method)
        async def handler(self: Servicer, request: Any, context: Context) -> Reply:
            return await self.guard.call(functools.partial(method, self), request, context,  # type: ignore[attr-defined]
                                         inference, admin)
        return handler
    return wrap
