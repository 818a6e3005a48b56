"""The errors a request can meet, protocol-free: each names the request field at fault and what was
expected there. Transports turn them into responses in one place each (``protocols/rest.py`` for HTTP).
"""

from __future__ import annotations

from typing import Any
from collections.abc import Mapping


class RequestError(ValueError):
    status: int = 400

    def __init__(self, field: str, message: str, expected: str | None = None,
                 details: Mapping[str, Any] | None = None):
        """``details`` are further body fields a client can act on without parsing the message (the
        expected shape, the feature names), beside ``error``, ``field`` and ``expected``."""
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.expected = expected
        self.details = dict(details or {})

    def at(self, prefix: str) -> RequestError:
        """The same error, its field named from the request's top (``instances.3`` + ``inputs``)."""
        return type(self)(f"{prefix}.{self.field}", self.message, self.expected, self.details)

    def body(self) -> dict[str, Any]:
        out = {"error": str(self), "field": self.field}
        if self.expected:
            out["expected"] = self.expected
        return {**out, **self.details}


class UnauthorizedError(RequestError):
    """No valid credentials: the client should send them (``WWW-Authenticate`` says how)."""

    status = 401


class ForbiddenError(RequestError):
    status = 403


class NotFoundError(RequestError):
    status = 404


class ConflictError(RequestError):
    """The request contradicts the state it would change (a variant still weighted, removed): the
    message says what to change first."""

    status = 409


class TooLargeError(RequestError):
    status = 413


class UnsupportedMediaError(RequestError):
    status = 415


class RateLimitedError(RequestError):
    """Over the caller's rate limit: ``details`` holds ``retry_after_s``, whole seconds until a request
    is admitted again (answered as ``Retry-After`` too)."""

    status = 429

    @property
    def retry_after_s(self) -> int:
        return int(self.details["retry_after_s"])


class UnavailableError(RequestError):
    """What the request names exists but cannot answer now (its model failed to load): retrying the
    same request will not help until the service is fixed and restarted; the message says why."""

    status = 503


class OverloadedError(Exception):
    """More requests in flight than the service takes: the client should retry after a pause."""

    status = 503

    def __init__(self, retry_after_s: int):
        super().__init__("overloaded: retry later")
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": str(self), "retry_after_s": self.retry_after_s}
