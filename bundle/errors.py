"""Client errors: each names the request field at fault and what was expected there."""

from __future__ import annotations


class RequestError(ValueError):
    status: int = 400

    def __init__(self, field: str, message: str, expected: str | None = None):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.expected = expected

    def body(self) -> dict[str, str]:
        out = {"error": str(self), "field": self.field}
        if self.expected:
            out["expected"] = self.expected
        return out


class NotFoundError(RequestError):
    status = 404


class TooLargeError(RequestError):
    status = 413


class UnsupportedMediaError(RequestError):
    status = 415
