"""Structured (JSON) logs, quiet by default: warnings only unless asked for more."""

from __future__ import annotations

import logging
import os

from pythonjsonlogger.json import JsonFormatter


def setup_logging(verbose: bool = False) -> None:
    level = logging.INFO if verbose or os.environ.get("BUNDLE_LOG_LEVEL") == "INFO" else logging.WARNING
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger("bundle")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"bundle.{name}")
