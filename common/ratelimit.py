"""Token buckets shared by every worker process of one server: a table in a memory-mapped file, guarded
by a file lock.

The rate arithmetic is pyrate-limiter's (:class:`pyrate_limiter.TokenBucket`: one theoretical arrival
time per key, the wait in closed form); only the storage is written here, because none of pyrate's
shared stores fits the hot path (measured by ``bench/ratelimit_cost.py``, ~1,400 requests/s per worker
leave a budget of a few tens of microseconds): its ``MultiprocessStateStore`` and
``MultiprocessBucket`` live in a ``multiprocessing.Manager`` that the parent must create and hand to
its children (BentoML spawns its workers from the command line: there is no parent of ours), and each
check is a round trip to the manager process; its ``SQLiteBucket`` logs one row per request and
commits per request, a few hundred microseconds under a file lock. Redis or Postgres would be a
network round trip per request for a limit that only has to hold within one machine.

The table is ``slots`` pairs (key hash, theoretical arrival time in microseconds of the system-wide
monotonic clock), in sets of :data:`WAYS`: a key lives in the set its hash names. A key seen for the
first time takes its set's emptiest slot (the smallest arrival time: a key whose bucket has refilled
owes nothing, so forgetting it changes nothing); when every slot of a set is owed, the least owed is
forgotten, so more active keys than slots fail open (they get a full bucket), never closed.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import time
from hashlib import blake2b
from pathlib import Path

from pyrate_limiter import Rate, TokenBucket

WAYS = 8
"""Slots per set: a key's possible places. Eight pairs are one 128-byte read, and eight active keys
colliding in one set is already rare in a table of thousands."""
SLOT = struct.Struct("<Qq")
WINDOW = struct.Struct("<" + "Qq" * WAYS)
ALGORITHM = TokenBucket()
US_PER_MS = 1000
"""pyrate's token bucket takes the time in milliseconds and keeps arrival times in microseconds."""


def key_hash(key: str) -> int:
    """A stable 64-bit hash (Python's ``hash`` differs per process); never 0, which marks a free slot."""
    return int.from_bytes(blake2b(key.encode(), digest_size=8).digest(), "little") or 1


class SharedBuckets:
    """One token bucket per key, in a table every process that opens ``path`` shares."""

    def __init__(self, path: Path, slots: int):
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            # The first process sizes the table; the others map what it made, whatever they were told.
            size = os.fstat(self._fd).st_size or -(-slots // WAYS) * WAYS * SLOT.size
            os.ftruncate(self._fd, size)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._table = mmap.mmap(self._fd, size)
        self.sets = size // WINDOW.size

    def take(self, key: str, rate: Rate) -> int:
        """Spend one of ``key``'s tokens: 0 when there was one, else the milliseconds until there is."""
        digest = key_hash(key)
        offset = digest % self.sets * WINDOW.size
        now_ms = time.monotonic_ns() // 1_000_000  # CLOCK_MONOTONIC: one clock for every process
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            window = WINDOW.unpack_from(self._table, offset)
            hashes, arrivals = window[0::2], window[1::2]
            way = hashes.index(digest) if digest in hashes else arrivals.index(min(arrivals))
            arrival = arrivals[way] if hashes[way] == digest else 0
            if arrival > now_ms * US_PER_MS + rate.burst * (rate.interval * US_PER_MS // rate.limit + 1):
                arrival = 0  # beyond any full debt: written before a reboot restarted the clock
            (arrival,), decision = ALGORITHM.step([rate], (arrival,), now_ms, 1)
            if decision.allowed:
                SLOT.pack_into(self._table, offset + way * SLOT.size, digest, arrival)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        # retry_after_ms is None only for a weight above the burst: never here (one token, burst >= 1)
        return 0 if decision.allowed else decision.retry_after_ms or 1

    def close(self) -> None:
        self._table.close()
        os.close(self._fd)
