"""Issue 19.6 on the routes ``tests/e2e/test_service.py`` does not hang up on: a client that hangs up
mid-body is counted by route (``bundle_client_disconnects_total``) and logs no error, no traceback."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.e2e.conftest import Server
from tests.e2e.test_service import hang_up_mid_body

pytestmark = pytest.mark.slow  # hangs up on the session server and waits for its metrics

HANG_UPS = 3
COUNTED_WITHIN_S = 10


def disconnects(client: httpx.Client, label: str) -> float:
    pattern = rf'bundle_client_disconnects_total\{{[^}}]*path="{re.escape(label)}"[^}}]*\}} (\S+)'
    return sum(float(v) for v in re.findall(pattern, client.get("/metrics").text))


@pytest.mark.parametrize("path", ["/predict_ndarray"])
def test_a_client_hanging_up_is_counted_not_logged_as_an_error(server: Server, client: httpx.Client,
                                                               path: str) -> None:
    before, log_before = disconnects(client, path), len(server.output())
    for _ in range(HANG_UPS):
        hang_up_mid_body(server, path)
    deadline = time.monotonic() + COUNTED_WITHIN_S
    while disconnects(client, path) - before < HANG_UPS and time.monotonic() < deadline:
        time.sleep(0.2)
    assert disconnects(client, path) - before == HANG_UPS
    new_log = server.output()[log_before:]
    assert "ClientDisconnect" not in new_log and "Traceback" not in new_log, new_log[-2000:]
    assert client.get("/readyz").status_code == 200, "the server keeps serving"
