"""The errors a request can meet, protocol-free: each names the request field at fault and what was
expected there. Transports turn them into responses in one place each (``protocols/rest.py`` for HTTP).
"""

from __future__ import annotations

from typing import Any


class RequestError(ValueError):
    status: int = 400

    def __init__(self, field: str, message: str, expected: str | None = None):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.expected = expected

    def body(self) -> dict[str, Any]:
        out = {"error": str(self), "field": self.field}
        if self.expected:
            out["expected"] = self.expected
        return out


class UnauthorizedError(RequestError):
    """No valid credentials: the client should send them (``WWW-Authenticate`` says how)."""

    status = 401


class ForbiddenError(RequestError):
    status = 403


class NotFoundError(RequestError):
    status = 404


class TooLargeError(RequestError):
    status = 413


class UnsupportedMediaError(RequestError):
    status = 415


class OverloadedError(Exception):
    """More requests in flight than the service takes: the client should retry after a pause."""

    status = 503

    def __init__(self, retry_after_s: int):
        super().__init__("overloaded: retry later")
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": str(self), "retry_after_s": self.retry_after_s}
