"""The one mapping of protocol-free errors to gRPC status codes (``protocols/grpc_guard.py``): each error
type gets its code, REST's message, and retry info exactly where a retry cures it."""

from __future__ import annotations

import grpc
import pytest
from bentoml.exceptions import ServiceUnavailable
from google.rpc import error_details_pb2, status_pb2

from common.errors import (ConflictError, ForbiddenError, NotFoundError, OverloadedError, RateLimitedError,
                           RequestError, TooLargeError, UnauthorizedError, UnavailableError)
from experiments.store import StoreUnavailable
from protocols.grpc_guard import RETRY_AFTER, status

RETRY_AFTER_S = 3
DETAILS = "grpc-status-details-bin"
"""Where gRPC carries the rich status (google.rpc.Status), as grpc_status reads it."""


@pytest.mark.parametrize(("error", "code", "retry"), [
    (RequestError("inputs", "got shape (2, 12)", "shape (N, 13)"), grpc.StatusCode.INVALID_ARGUMENT, None),
    (NotFoundError("model", "unknown model 'nope'", "digits, wine"), grpc.StatusCode.NOT_FOUND, None),
    (TooLargeError("inputs", "1025 rows is more than the limit", "at most 1024 rows"),
     grpc.StatusCode.RESOURCE_EXHAUSTED, None),
    (UnauthorizedError("X-API-Key", "an API key is required", "X-API-Key: <key>"),
     grpc.StatusCode.UNAUTHENTICATED, None),
    (ForbiddenError("Authorization", "admin endpoints are disabled", "set BUNDLE_ADMIN_TOKEN on the server"),
     grpc.StatusCode.PERMISSION_DENIED, None),
    (ConflictError("name", "model wine_sklearn:v1 still takes traffic as wine/sklearn-v1 (weight 1)"),
     grpc.StatusCode.FAILED_PRECONDITION, None),
    (RateLimitedError("X-API-Key", "over its rate limit", "5 per hour", {"retry_after_s": 7}),
     grpc.StatusCode.RESOURCE_EXHAUSTED, 7),
    (OverloadedError(RETRY_AFTER_S), grpc.StatusCode.RESOURCE_EXHAUSTED, RETRY_AFTER_S),
    (ServiceUnavailable("overloaded: the batch queue cannot meet max_latency_ms"),
     grpc.StatusCode.RESOURCE_EXHAUSTED, RETRY_AFTER_S),
    (UnavailableError("model", "every variant failed to load"), grpc.StatusCode.UNAVAILABLE, None),
    (StoreUnavailable("database is locked"), grpc.StatusCode.UNAVAILABLE, None),
    (KeyError("a bug"), grpc.StatusCode.INTERNAL, None),
])
def test_each_error_has_its_code_and_retry_info_only_when_a_retry_helps(
        error: Exception, code: grpc.StatusCode, retry: int | None) -> None:
    refusal = status(error, RETRY_AFTER_S)
    assert refusal.code == code and refusal.retry_after_s == retry
    metadata = dict(refusal.trailing_metadata())
    if retry is None:
        assert metadata == {}
        return
    assert metadata[RETRY_AFTER] == str(retry)
    rich = status_pb2.Status.FromString(metadata[DETAILS])
    info = error_details_pb2.RetryInfo()
    assert rich.message == refusal.message and rich.details[0].Unpack(info) and info.retry_delay.seconds == retry


def test_messages_name_the_field_and_what_was_expected() -> None:
    assert status(RequestError("inputs", "got shape (2, 12)", "shape (N, 13)"), RETRY_AFTER_S).message == \
        "inputs: got shape (2, 12) (expected shape (N, 13))"
    assert status(KeyError("secret detail"), RETRY_AFTER_S).message == "internal error: see the server log"
