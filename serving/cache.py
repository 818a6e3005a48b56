"""The optional prediction cache (``cache.backend``): a row seen before is answered without the runtime.

A cached value is one probability row, keyed by the model tag and the canonical bytes of one input row
(float32, C-contiguous, with its shape), so answers are never shared across variants or model versions.
Lookups are per row: a request with some hits sends only its misses to the batch queue, and its answer
keeps the rows' order. A model loaded or unloaded by the repository drops its tag's rows.

Two backends: an LRU in each worker (``memory``), or one Redis shared by every worker and replica
(``redis``, a generation number per tag inside every key, bumped on each load and unload). A Redis that
fails is bypassed, never the answers: its rows go to the runtime, are counted as ``error``, and it is
logged at most once a minute.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import numpy as np
import redis
import redis.asyncio
import redis.asyncio.retry
import redis.retry
from redis.backoff import NoBackoff

from common import metrics
from common.config import Cache
from common.logs import get_logger

log = get_logger("cache")
LOG_EVERY_S = 60.0
"""A failing Redis is logged at most this often (every failed row is counted)."""
RETRY_S = 1.0
"""After a Redis failure, the cache is bypassed this long before Redis is tried again (a Redis that
hangs would otherwise cost every request its timeout)."""
REDIS_TIMEOUT_S = 0.1
PROBABILITY = np.dtype(np.float32)
"""Every runtime answers float32 probabilities (``runtimes/base.py``); Redis keeps their bytes."""

Infer = Callable[[str, np.ndarray], Awaitable[np.ndarray]]


class Backend(Protocol):
    async def get(self, tag: str, keys: Sequence[bytes]) -> list[np.ndarray | None]: ...

    async def put(self, tag: str, keys: Sequence[bytes], rows: np.ndarray) -> None: ...

    def drop(self, tag: str) -> None: ...


class PredictionCache:
    """Answers the rows it holds, sends the others to ``infer`` and keeps their answers."""

    def __init__(self, backend: Backend):
        self.backend = backend

    async def predict(self, infer: Infer, tag: str, rows: np.ndarray) -> np.ndarray:
        """The probabilities of ``rows`` under model ``tag``, in order: cached rows from the cache, the
        others from ``infer`` (the batch queue), whose failure is the caller's as without a cache."""
        rows = np.ascontiguousarray(rows, np.float32)
        shape = repr(rows.shape[1:]).encode()
        keys = [shape + row.tobytes() for row in rows]
        try:
            cached = await self.backend.get(tag, keys)
        except CacheUnavailable:
            metrics.CACHE.labels(model_tag=tag, outcome="error").inc(len(rows))
            return await infer(tag, rows)
        missed = [i for i, row in enumerate(cached) if row is None]
        if missed:
            metrics.CACHE.labels(model_tag=tag, outcome="miss").inc(len(missed))
        if len(missed) < len(rows):
            metrics.CACHE.labels(model_tag=tag, outcome="hit").inc(len(rows) - len(missed))
        if not missed:
            return np.stack(cached)  # type: ignore[arg-type]
        answered = await infer(tag, rows if len(missed) == len(rows) else rows[missed])
        try:
            await self.backend.put(tag, [keys[i] for i in missed], answered)
        except CacheUnavailable:
            metrics.CACHE.labels(model_tag=tag, outcome="error").inc(len(missed))
        if len(missed) == len(rows):
            return answered
        out = np.empty((len(rows), *answered.shape[1:]), answered.dtype)
        hits = [i for i, row in enumerate(cached) if row is not None]
        out[hits] = np.stack([cached[i] for i in hits])  # type: ignore[misc]
        out[missed] = answered
        return out

    def drop(self, tag: str) -> None:
        """``tag`` was loaded or unloaded: none of its cached rows is answered again. Blocking (the
        repository's thread)."""
        self.backend.drop(tag)


class CacheUnavailable(Exception):
    """The backend failed: the rows go to the runtime."""


class MemoryBackend:
    """An LRU of ``max_rows`` rows in this worker.

    An ``OrderedDict`` rather than a library: no LRU package (cachetools or the like) is among the
    project's dependencies, and this is a dozen lines. A lock, because the repository's thread drops a
    tag while the event loop reads and writes.
    """

    def __init__(self, max_rows: int):
        self._max_rows = max_rows
        self._rows: OrderedDict[tuple[str, bytes], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    async def get(self, tag: str, keys: Sequence[bytes]) -> list[np.ndarray | None]:
        found: list[np.ndarray | None] = []
        with self._lock:
            for key in keys:
                row = self._rows.get((tag, key))
                if row is not None:
                    self._rows.move_to_end((tag, key))
                found.append(row)
        return found

    async def put(self, tag: str, keys: Sequence[bytes], rows: np.ndarray) -> None:
        with self._lock:
            for key, row in zip(keys, rows):
                self._rows[(tag, key)] = row.copy()  # a copy: a view would keep its whole batch alive
                self._rows.move_to_end((tag, key))
            while len(self._rows) > self._max_rows:
                self._rows.popitem(last=False)

    def drop(self, tag: str) -> None:
        with self._lock:
            for key in [k for k in self._rows if k[0] == tag]:
                del self._rows[key]

    def __len__(self) -> int:
        return len(self._rows)


class RedisBackend:
    """One Redis shared by every worker and replica: a lookup is one round trip (the tag's generation
    and an MGET of its rows under the generation this worker last saw), a store one pipeline of SETs
    with a TTL. A generation that moved on (another worker loaded or unloaded the tag) makes that
    lookup all misses, and the next ones use the new generation."""

    def __init__(self, url: str, ttl_s: float, timeout_s: float = REDIS_TIMEOUT_S):
        # No retries (redis-py retries thrice with backoff by default): a failed call is a bypass at once.
        options = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
        self._client = redis.asyncio.Redis.from_url(url, retry=redis.asyncio.retry.Retry(NoBackoff(), 0), **options)
        # The repository's thread, off the event loop.
        self._sync = redis.Redis.from_url(url, retry=redis.retry.Retry(NoBackoff(), 0), **options)
        self._ttl_ms = int(ttl_s * 1000)
        self._generations: dict[str, bytes] = {}
        self._down_until = 0.0
        self._logged_at = -LOG_EVERY_S

    async def get(self, tag: str, keys: Sequence[bytes]) -> list[np.ndarray | None]:
        self._check_up()
        generation = self._generations.get(tag, b"0")
        prefix = _prefix(tag, generation)
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.get(_generation_key(tag))
            pipe.mget([prefix + key for key in keys])
            current, values = await pipe.execute()
        except redis.RedisError as err:
            raise self._failed(err) from err
        current = current or b"0"
        if current != generation:
            self._generations[tag] = current
            return [None] * len(keys)
        return [None if v is None else np.frombuffer(v, PROBABILITY) for v in values]

    async def put(self, tag: str, keys: Sequence[bytes], rows: np.ndarray) -> None:
        self._check_up()
        prefix = _prefix(tag, self._generations.get(tag, b"0"))
        try:
            pipe = self._client.pipeline(transaction=False)
            for key, row in zip(keys, rows.astype(PROBABILITY, copy=False)):
                pipe.set(prefix + key, row.tobytes(), px=self._ttl_ms)
            await pipe.execute()
        except redis.RedisError as err:
            raise self._failed(err) from err

    def drop(self, tag: str) -> None:
        """A new generation for ``tag``: every worker's next lookup sees it and misses. Redis down:
        logged; its rows expire with their TTL."""
        try:
            self._generations[tag] = str(self._sync.incr(_generation_key(tag))).encode()
        except redis.RedisError as err:
            log.warning("prediction cache generation not bumped",
                        extra={"model_tag": tag, "reason": str(err)})

    def _check_up(self) -> None:
        if time.monotonic() < self._down_until:
            raise CacheUnavailable("redis failed recently")

    def _failed(self, err: Exception) -> CacheUnavailable:
        now = time.monotonic()
        self._down_until = now + RETRY_S
        if now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
            log.warning("prediction cache unavailable: answering from the runtimes",
                        extra={"reason": str(err), "retry_s": RETRY_S})
        return CacheUnavailable(str(err))

    async def close(self) -> None:
        await self._client.aclose()
        self._sync.close()


def _generation_key(tag: str) -> bytes:
    return f"bundle:cache:generation:{tag}".encode()


def _prefix(tag: str, generation: bytes) -> bytes:
    return f"bundle:cache:{tag}:".encode() + generation + b":"


def from_config(settings: Cache) -> PredictionCache | None:
    """The cache ``cache.backend`` asks for, or None when it is off."""
    if settings.backend == "memory":
        return PredictionCache(MemoryBackend(settings.max_rows))
    if settings.backend == "redis":
        return PredictionCache(RedisBackend(settings.resolved_redis_url() or "", settings.ttl_s))
    return None
