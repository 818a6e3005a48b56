"""Structured (JSON) logs, quiet by default: warnings only unless asked for more. Every record names
the replica that wrote it (``replica``, as answers' ``X-Replica-Id``), so a fleet's logs can be merged."""

from __future__ import annotations

import logging
import os
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

from common.ids import replica_id

BENTOML_REQUEST_LOGGER = "bentoml._internal.server.http_app"

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
"""The id of the request being served (set by the HTTP front door, answered as ``X-Request-Id``)."""

API_KEY: ContextVar[str | None] = ContextVar("api_key", default=None)
"""The name of the API key the request came with (set by the front door when keys are on), for the
prediction log and the metrics."""


def tag_with_request(err: BaseException) -> None:
    """Name the request in the traceback of a server error, wherever it is logged (a note on the
    exception: logging prints notes with the traceback)."""
    request_id = REQUEST_ID.get()
    if request_id is not None:
        err.add_note(f"request_id: {request_id}")


class _ClientErrors(logging.Filter):
    """BentoML logs every rejected request with a traceback at ERROR level. A client's bad input is
    answered with a 4xx that names the problem, and a client that hung up mid-request is counted by
    the front door (``bundle_client_disconnects_total``): neither is a server error worth a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from bentoml.exceptions import BentoMLException
        from pydantic import ValidationError
        from starlette.requests import ClientDisconnect

        error = record.exc_info[1] if record.exc_info else None
        client = isinstance(error, (ValidationError, ClientDisconnect)) or (
            isinstance(error, BentoMLException) and error.error_code.value < 500)
        return not client


def setup_logging(verbose: bool = False) -> None:
    level = logging.INFO if verbose or os.environ.get("BUNDLE_LOG_LEVEL") == "INFO" else logging.WARNING
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                       static_fields={"replica": replica_id()}))
    root = logging.getLogger("bundle")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    logging.getLogger(BENTOML_REQUEST_LOGGER).addFilter(_ClientErrors())


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"bundle.{name}")
