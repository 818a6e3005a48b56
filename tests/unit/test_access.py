"""Issue 19.5: what the front door decides about a request when API keys or rate limits are on
(``protocols/access.py``), in process, on a real bucket table. The HTTP answers and the workers'
sharing are in ``tests/e2e/test_access.py``."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from common import config
from common.config import Access as AccessSettings
from common.errors import RateLimitedError, UnauthorizedError
from protocols.access import Access

KEY = "the-key"
DIGEST = hashlib.sha256(KEY.encode()).hexdigest()
BASE = config.load()


@pytest.fixture
def table_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """BentoML gives each server's workers this folder; here a test's own."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    return tmp_path


def access_with(**settings: object) -> Access:
    access = Access()
    access.apply(BASE.model_copy(update={"access": AccessSettings.model_validate(settings)}))
    return access


def scope(*headers: tuple[bytes, bytes], client: str = "10.0.0.1") -> dict:
    return {"headers": [(b"host", b"localhost"), *headers], "client": (client, 40000)}


def test_keys_and_limits_off_leave_the_front_door_one_attribute_check(table_folder: Path) -> None:
    assert not access_with().active
    assert not access_with(keys=[{"name": "a", "sha256": DIGEST}]).active  # listed, not required
    assert not list(table_folder.iterdir())  # no bucket table either


def test_revoking_the_last_key_refuses_everyone_rather_than_opening_the_service(table_folder: Path) -> None:
    access = access_with(require_keys=True, keys=[{"name": "a", "sha256": DIGEST}])
    access.admit(scope((b"x-api-key", KEY.encode())))
    access.apply(BASE.model_copy(update={"access": AccessSettings(require_keys=True, keys=[])}))
    with pytest.raises(UnauthorizedError, match="revoked"):
        access.admit(scope((b"x-api-key", KEY.encode())))


def test_a_key_is_read_from_x_api_key_first_then_from_a_bearer_authorization(table_folder: Path) -> None:
    access = access_with(require_keys=True, keys=[{"name": "a", "sha256": DIGEST}])
    access.admit(scope((b"authorization", f"bearer {KEY}".encode())))
    with pytest.raises(UnauthorizedError) as refused:
        access.admit(scope((b"authorization", f"Bearer {KEY}".encode()), (b"x-api-key", b"other")))
    assert refused.value.field == "X-API-Key"
    with pytest.raises(UnauthorizedError, match="required"):
        access.admit(scope((b"authorization", f"Basic {KEY}".encode())))


def test_a_caller_over_its_limit_is_told_its_limit_and_whole_seconds_to_wait(table_folder: Path) -> None:
    access = access_with(require_keys=True, keys=[
        {"name": "a", "sha256": DIGEST, "rate_limit": {"requests": 2, "per_s": 60}}])
    given = scope((b"x-api-key", KEY.encode()))
    access.admit(given)
    access.admit(given)
    with pytest.raises(RateLimitedError) as limited:
        access.admit(given)
    assert 1 <= limited.value.retry_after_s <= 30  # one token every 30 s
    assert limited.value.body()["expected"] == "at most 2 requests per 60 s, 2 at once"


def test_without_keys_each_client_address_has_its_own_bucket(table_folder: Path) -> None:
    access = access_with(rate_limit={"requests": 1, "per_s": 3600})
    access.admit(scope(client="10.0.0.1"))
    with pytest.raises(RateLimitedError) as limited:
        access.admit(scope(client="10.0.0.1"))
    assert limited.value.field == "client"
    access.admit(scope(client="10.0.0.2"))
