"""API keys and rate limits of the inference routes (``access`` in ``config.yaml``; ``docs/security.md``).

The front door (``protocols/guard.py``) asks :meth:`Access.admit` about every inference request while
keys or limits are on, before any body is read: a missing or unknown key is a 401, a caller over its
token bucket a 429 with ``Retry-After``. Off (the default), the front door only reads
:attr:`Access.active`.

The rules follow ``config.yaml`` live: the configuration watcher of ``experiments/live.py`` hands every
configuration it applies to :meth:`Access.apply`, so a removed key is refused by every worker within a
poll of the file. The buckets are shared by the server's workers (``common/ratelimit.py``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import Counter
from pyrate_limiter import Rate

from common.config import Config, RateLimit
from common.errors import RateLimitedError, UnauthorizedError
from common.logs import API_KEY
from common.metrics import API_REQUESTS, MULTIPROC_ENV
from common.ratelimit import SharedBuckets

KEY_HEADER = b"x-api-key"
AUTHORIZATION = b"authorization"
HOW = "X-API-Key: <key>, or Authorization: Bearer <key>"
ANONYMOUS = "anonymous"
"""The metrics' name for callers when keys are off (client addresses would be unbounded series)."""
NO_KEY = "none"
MS_PER_S = 1000


def table_path() -> Path:
    """The bucket table of this server: its workers are siblings, so their parent's id names it; BentoML's
    metrics folder is the server's own and emptied when it starts (a temporary folder outside BentoML)."""
    folder = os.environ.get(MULTIPROC_ENV) or tempfile.gettempdir()
    return Path(folder) / f"bundle-ratelimit-{os.getppid()}.table"


def rate(limit: RateLimit | None) -> Rate | None:
    return None if limit is None else Rate(limit.requests, round(limit.per_s * MS_PER_S), limit.burst)


@dataclass(frozen=True)
class Caller:
    name: str
    rate: Rate | None
    describe: str
    """The limit in words, for the 429's ``expected``."""
    admitted: Counter
    limited: Counter
    """Its ``bundle_api_requests_total`` series, labelled once here: ``labels()`` costs ~3.5 µs, as much
    as half the bucket (measured beside ``bench/ratelimit_cost.py``)."""


def caller(name: str, limit: RateLimit | None) -> Caller:
    describe = "" if limit is None else (f"at most {limit.requests} requests per {limit.per_s:g} s, "
                                         f"{limit.burst or limit.requests} at once")
    return Caller(name, rate(limit), describe, API_REQUESTS.labels(key=name, outcome="admitted"),
                  API_REQUESTS.labels(key=name, outcome="rate_limited"))


@dataclass(frozen=True)
class Policy:
    """One configuration's rules, swapped whole so a request never sees half of an edit."""

    require_keys: bool
    keys: dict[bytes, Caller]
    """By the SHA-256 digest of the key."""
    anonymous: Caller


class Access:
    """What the front door checks on inference routes; inert until a configuration turns it on."""

    def __init__(self) -> None:
        self.active = False
        self._policy: Policy | None = None
        self._buckets: SharedBuckets | None = None

    def apply(self, new: Config) -> None:
        """Follow ``new.access`` from the next request on (called by the configuration watcher)."""
        settings = new.access
        if not settings.active:  # nothing is made, so nothing shows in the metrics either
            self.active = False
            return
        if self._buckets is None:
            self._buckets = SharedBuckets(table_path(), settings.table_slots)
        self._policy = Policy(
            settings.require_keys,
            {bytes.fromhex(key.sha256): caller(key.name, key.rate_limit or settings.rate_limit)
             for key in settings.keys},
            caller(ANONYMOUS, settings.rate_limit))
        self.active = True

    def admit(self, scope: dict[str, Any]) -> None:
        """Let the request through, or raise the 401 or 429 that says why not."""
        policy = self._policy
        assert policy is not None, "active only once apply() made one"
        if policy.require_keys:
            who = self._identify(policy, scope["headers"])
            API_KEY.set(who.name)  # this request's task and what it starts, as REQUEST_ID
            field, whom, bucket = "X-API-Key", f"key {who.name!r}", f"key:{who.name}"
        else:
            who = policy.anonymous
            address = (scope.get("client") or ("",))[0]
            field, whom, bucket = "client", f"client {address}", f"address:{address}"
        if who.rate is not None:
            assert self._buckets is not None, "made by apply() whenever access is active"
            wait_ms = self._buckets.take(bucket, who.rate)
            if wait_ms:
                who.limited.inc()
                wait_s = -(-wait_ms // MS_PER_S)
                raise RateLimitedError(field, f"{whom} is over its rate limit: retry after {wait_s} s",
                                       who.describe, {"retry_after_s": wait_s})
        who.admitted.inc()

    @staticmethod
    def _identify(policy: Policy, headers: list[tuple[bytes, bytes]]) -> Caller:
        """The caller whose key the request carries. A dictionary lookup by the key's SHA-256 leaks no
        timing about the key itself, only about digests an attacker cannot invert."""
        given = {name: value for name, value in headers if name in (KEY_HEADER, AUTHORIZATION)}
        field, key = "X-API-Key", given.get(KEY_HEADER)
        if key is None and AUTHORIZATION in given:
            scheme, _, token = given[AUTHORIZATION].partition(b" ")
            if scheme.lower() == b"bearer":
                field, key = "Authorization", token.strip()
        who = policy.keys.get(hashlib.sha256(key).digest()) if key else None
        if who is None:
            API_REQUESTS.labels(key=NO_KEY, outcome="unauthorized").inc()
            problem = "an API key is required" if key is None else "unknown or revoked API key"
            raise UnauthorizedError(field, problem, HOW)
        return who
