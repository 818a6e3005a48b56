"""Every log record names the replica that wrote it, as answers do (``X-Replica-Id``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from common.ids import REPLICA_ENV
from common.logs import get_logger, setup_logging


@pytest.fixture
def bundle_logger() -> Iterator[None]:
    root = logging.getLogger("bundle")
    saved = (root.handlers[:], root.level, root.propagate)
    yield
    root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


def test_a_record_carries_the_replica_id(bundle_logger: None, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(REPLICA_ENV, "replica-7:3001")
    setup_logging()
    get_logger("experiments").warning("experiment store unreachable", extra={"reason": "test"})
    record = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert record["replica"] == "replica-7:3001"
    assert record["message"] == "experiment store unreachable" and record["reason"] == "test"
