"""Per-request cost of a rate limit shared by worker processes: pyrate-limiter's SQLite bucket under its
file lock against the shared-memory table of ``common/ratelimit.py`` (both with pyrate's arithmetic),
and the front door's whole check with a key (``protocols/access.py``: header, SHA-256, bucket, metric).

``python -m bench.ratelimit_cost`` prints microseconds per check, one process, no contention: the
figure the service pays per request on top of its ~700 µs of work per request and worker.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pyrate_limiter import Duration, Limiter, Rate, SQLiteBucket

from common import config
from common.config import Access as AccessSettings
from common.ratelimit import SharedBuckets
from protocols.access import Access

CHECKS = 20_000
RATE = Rate(10**9, Duration.SECOND)
"""Never refused: both sides do the full admit-and-record work on every check."""
TABLE_SLOTS = 4096


def per_check_us(check: Callable[[], object], checks: int = CHECKS) -> float:
    check()
    started = time.perf_counter()
    for _ in range(checks):
        check()
    return (time.perf_counter() - started) / checks * 1e6


def keyed_access(folder: Path) -> Callable[[], None]:
    """The front door's check of one request that carries a key with a rate limit."""
    key = "bench-key"
    settings = AccessSettings.model_validate({
        "require_keys": True, "table_slots": TABLE_SLOTS,
        "keys": [{"name": "bench", "sha256": hashlib.sha256(key.encode()).hexdigest(),
                  "rate_limit": {"requests": RATE.limit}}]})
    access = Access()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)  # the bucket table's folder, as in a worker
    access.apply(config.load().model_copy(update={"access": settings}))
    scope = {"headers": [(b"host", b"localhost"), (b"content-type", b"application/json"),
                         (b"x-api-key", key.encode())], "client": ("127.0.0.1", 5000)}
    return lambda: access.admit(scope)


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        sqlite = SQLiteBucket.init_from_file([RATE], db_path=str(Path(folder) / "limits.sqlite"),
                                             use_file_lock=True)
        # blocking=False fails here: pyrate 4.5.1 passes a bool timeout to filelock 4.2.11, which refuses
        # it. Blocking is the same work while the rate never refuses.
        limiter = Limiter(sqlite)
        table = SharedBuckets(Path(folder) / "limits.table", TABLE_SLOTS)
        rows = {
            "pyrate-limiter SQLiteBucket + file lock (Limiter.try_acquire)":
                per_check_us(lambda: limiter.try_acquire("team-a"), CHECKS // 10),
            "common/ratelimit.py SharedBuckets.take (mmap + flock)":
                per_check_us(lambda: table.take("team-a", RATE)),
        }
        rows["protocols/access.py Access.admit (X-API-Key, bucket, counter)"] = per_check_us(
            keyed_access(Path(folder)))
        table.close()
        limiter.close()
    for name, cost in rows.items():
        print(f"{cost:8.1f} µs  {name}")


if __name__ == "__main__":
    main()
