"""Batch queues, one per variant: a request runs at once when its runtime is idle, and what queued
while a batch ran goes together into the next call.

Why not BentoML's adaptive batcher (``batchable=True``, its ``CorkDispatcher``): it holds requests
for about the mean wait it observed, and that wait includes its own holds, so after a load spike it
keeps holding single requests for tens of milliseconds (measured: p50 40 ms instead of 5 ms, easing
~15% in 30 s). Here nothing is ever held while the runtime is free; batches form only from what
arrives during a call, so a batch's wait is at most one call.

Overload is shed on the queue's depth: a request whose expected wait (the calls ahead of it, each as
long as recent calls took) would exceed ``batching.max_latency_ms`` gets 503 at once, instead of
being answered too late.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import anyio.to_thread
import numpy as np
from bentoml.exceptions import ServiceUnavailable

from common.config import Batching
from common.errors import UnavailableError
from runtimes import Runtime

RECENT_CALLS_WEIGHT = 0.2
"""Weight of the newest call in the moving average of call durations (about the last five calls)."""


class _Queue:
    def __init__(self, runtime: Runtime, max_rows: int, max_wait_s: float):
        self._runtime = runtime
        self._max_rows = max_rows
        self._max_wait_s = max_wait_s
        self._pending: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = []
        self._queued_rows = 0
        self._running = False
        self._drainer: asyncio.Task[None] | None = None
        self._call_s = 0.0  # 0 until the first call is measured: nothing is shed before that

    async def predict(self, rows: np.ndarray) -> np.ndarray:
        calls_ahead = (self._queued_rows + len(rows)) // self._max_rows + self._running
        if calls_ahead * self._call_s > self._max_wait_s:
            raise ServiceUnavailable("overloaded: the batch queue cannot meet max_latency_ms; retry later")
        answer: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._pending.append((rows, answer))
        self._queued_rows += len(rows)
        if not self._running:
            self._running = True
            # Kept: the event loop holds tasks weakly, and a collected drain would strand its queue.
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        return await answer

    def _next_batch(self) -> list[tuple[np.ndarray, asyncio.Future[np.ndarray]]]:
        """What queued, in order, up to ``max_batch_size`` rows (a larger first request runs alone)."""
        taken, rows = 0, 0
        while taken < len(self._pending):
            size = len(self._pending[taken][0])
            if taken and rows + size > self._max_rows:
                break
            rows += size
            taken += 1
        batch, self._pending = self._pending[:taken], self._pending[taken:]
        self._queued_rows -= rows
        return batch

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = self._next_batch()
                started = time.perf_counter()
                try:
                    probabilities = await anyio.to_thread.run_sync(
                        self._runtime.infer, np.concatenate([rows for rows, _ in batch]))
                except Exception as err:  # one failed call fails only its own requests
                    for _, answer in batch:
                        if not answer.done():
                            answer.set_exception(err)
                    continue
                finally:
                    took = time.perf_counter() - started
                    recent = self._call_s + RECENT_CALLS_WEIGHT * (took - self._call_s)
                    self._call_s = recent if self._call_s else took
                parts = np.split(probabilities, np.cumsum([len(rows) for rows, _ in batch])[:-1])
                for (_, answer), part in zip(batch, parts):
                    if not answer.done():  # a client that went away leaves a cancelled future
                        answer.set_result(part)
        finally:
            self._running = False


class Batcher:
    def __init__(self, runtimes: Mapping[str, Runtime], settings: Batching):
        self._settings = settings
        self._queues: dict[str, _Queue] = {}
        for tag, runtime in runtimes.items():
            self.add(tag, runtime)

    def add(self, tag: str, runtime: Runtime) -> None:
        """A queue for ``runtime`` (a new model, or a new runtime of one): requests already queued for
        the old one finish on it."""
        self._queues[tag] = _Queue(runtime, self._settings.max_batch_size, self._settings.max_latency_ms / 1000)

    def remove(self, tag: str) -> None:
        """No new request joins ``tag``'s queue; what it holds still runs."""
        self._queues.pop(tag, None)

    async def predict(self, model_tag: str, rows: np.ndarray) -> np.ndarray:
        queue = self._queues.get(model_tag)
        if queue is None:
            raise _unloaded(model_tag)
        return await queue.predict(rows)


class Unbatched:
    """``batching.enabled: false``: every request runs alone, to measure what batching buys."""

    def __init__(self, runtimes: Mapping[str, Runtime]):
        self._runtimes = dict(runtimes)

    def add(self, tag: str, runtime: Runtime) -> None:
        self._runtimes[tag] = runtime

    def remove(self, tag: str) -> None:
        self._runtimes.pop(tag, None)

    async def predict(self, model_tag: str, rows: np.ndarray) -> np.ndarray:
        runtime = self._runtimes.get(model_tag)
        if runtime is None:
            raise _unloaded(model_tag)
        return await anyio.to_thread.run_sync(runtime.infer, rows)


def _unloaded(model_tag: str) -> UnavailableError:
    """A request routed just before its model was unloaded (the router no longer sends any there)."""
    return UnavailableError("model_tag", f"model {model_tag} was unloaded from this worker; retry")
