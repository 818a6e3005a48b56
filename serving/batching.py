"""Adaptive batching for endpoints whose request body is not a list of rows.

BentoML's public ``batchable=True`` batches an endpoint with exactly one list/array argument; that
serves ``/predict``. ``/predict_ndarray`` and ``/classify_image`` carry a model name and a user id
beside the rows and are routed before they can be batched, so they share one batch queue per
variant through the same class BentoML uses behind ``batchable=True`` (its CorkDispatcher, pinned
with bentoml==1.4.39), in-process: no extra hop, no copy beyond the concatenation.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Mapping, Sequence

import anyio.to_thread
import numpy as np
from bentoml._internal.marshal.dispatcher import CorkDispatcher
from bentoml.exceptions import ServiceUnavailable

from common.config import Batching
from runtimes import Runtime

def _overloaded() -> np.ndarray:
    raise ServiceUnavailable("overloaded: the batch queue cannot meet max_latency_ms; retry later")


class Batcher:
    def __init__(self, runtimes: Mapping[str, Runtime], settings: Batching):
        self._queues = {tag: self._queue(runtime, settings) for tag, runtime in runtimes.items()}

    @staticmethod
    def _queue(runtime: Runtime, settings: Batching) -> Callable[[np.ndarray], Awaitable[np.ndarray]]:
        dispatcher: CorkDispatcher[np.ndarray, np.ndarray] = CorkDispatcher(
            max_latency_in_ms=settings.max_latency_ms,
            max_batch_size=settings.max_batch_size,
            fallback=_overloaded,
            get_batch_size=len,
        )

        async def run(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
            probabilities = await anyio.to_thread.run_sync(runtime.infer, np.concatenate(parts))
            return np.split(probabilities, np.cumsum([len(p) for p in parts])[:-1])

        return dispatcher(run)

    async def predict(self, model_tag: str, rows: np.ndarray) -> np.ndarray:
        return await self._queues[model_tag](rows)


class Unbatched:
    """``batching.enabled: false``: every request runs alone, to measure what batching buys."""

    def __init__(self, runtimes: Mapping[str, Runtime]):
        self._runtimes = runtimes

    async def predict(self, model_tag: str, rows: np.ndarray) -> np.ndarray:
        return await anyio.to_thread.run_sync(self._runtimes[model_tag].infer, rows)
