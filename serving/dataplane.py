"""The one serving path under every protocol: route -> batch -> runtime -> answer -> count.

Protocols decode their wire format into :class:`InferenceRequest` and encode the
:class:`BatchPrediction` they get back; nothing here knows about HTTP, JSON or tensors on the wire.
Every request takes the same steps: routed, queued with concurrent requests for the same variant
(``serving/batching.py``), run, answered, counted, copied to the shadow.

Errors are protocol-free (``common/errors.py``); each transport maps them to responses once.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from typing import Any, Sequence

import numpy as np

from common import metrics
from common.logs import tag_with_request
from common.schema import Schema
from experiments.live import LiveExperiments
from experiments.router import Route, Router
from experiments.shadow import Shadow
from serving.batching import Batcher, Unbatched
from serving.catalog import Catalog
from serving.types import BatchPrediction, InferenceRequest


class DataPlane:
    def __init__(self, catalog: Catalog, live: LiveExperiments, queue: Batcher | Unbatched, shadow: Shadow,
                 max_rows: int):
        self.catalog = catalog
        self.live = live
        self._queue = queue
        self._shadow = shadow
        self._max_rows = max_rows

    @property
    def router(self) -> Router:
        """The weights in force; a change swaps in a new router, so read it once per request."""
        return self.live.router

    def schema(self, model: str) -> Schema:
        """The input contract of a logical model, or the 404 that names the served models."""
        self.router.experiment(model)
        return self.catalog.schemas[model]

    def rows(self, model: str, inputs: Any, field: str) -> np.ndarray:
        """``inputs`` as rows of ``model`` within ``limits.max_rows``, or the 4xx that names ``field``."""
        return self.schema(model).batch(inputs, field, self._max_rows)

    async def infer(self, endpoint: str, requests: Sequence[InferenceRequest]) -> list[BatchPrediction]:
        """One answer per request, in order. Requests are routed, then each variant's rows join that
        variant's batch queue together, batched with concurrent requests."""
        router = self.router
        groups: dict[tuple[str, Route], list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[(request.model, router.route(request.model, request.user_id, request.variant))].append(index)
        answers: list[BatchPrediction] = [None] * len(requests)  # type: ignore[list-item]

        async def run(model: str, route: Route, indices: list[int]) -> None:
            rows = requests[indices[0]].rows if len(indices) == 1 else np.concatenate(
                [requests[i].rows for i in indices])
            try:
                probabilities = await self._queue.predict(route.variant.model, rows)
            except Exception as err:  # counted per variant, then the transport answers 500 (or 503 when shedding)
                self._count(endpoint, model, route, router, "error", len(rows))
                tag_with_request(err)
                raise
            answer = self._answer(endpoint, model, route, router, rows, probabilities)
            if len(indices) == 1:
                answers[indices[0]] = answer
                return
            start = 0
            for index in indices:
                stop = start + len(requests[index].rows)
                answers[index] = answer.rows(start, stop)
                start = stop

        if len(groups) == 1:
            await run(*next(iter(groups)), next(iter(groups.values())))
        else:
            await asyncio.gather(*(run(model, route, indices) for (model, route), indices in groups.items()))
        return answers

    def _answer(self, endpoint: str, model: str, route: Route, router: Router, rows: np.ndarray,
                probabilities: np.ndarray) -> BatchPrediction:
        """Label the answer, count it, and hand a copy to the shadow, after the live result exists."""
        classes = self.catalog.schemas[model].classes
        predicted = probabilities.argmax(axis=1)
        labels = [classes[i] for i in predicted]
        variant = route.variant.name
        self._count(endpoint, model, route, router, "ok", len(rows))
        for label, count in Counter(labels).items():
            metrics.LABELS.labels(model=model, variant=variant, label=label).inc(count)
        shadow = router.experiment(model).shadow
        if shadow is not None:
            self._shadow.submit(model, shadow, rows, predicted)
        # Our own values, already of the declared types: constructed without a second validation.
        return BatchPrediction.model_construct(model=model, variant=variant, model_tag=route.variant.model,
                                               pinned=route.pinned, labels=labels,
                                               probabilities=probabilities.tolist())

    @staticmethod
    def _count(endpoint: str, model: str, route: Route, router: Router, outcome: str, rows: int) -> None:
        metrics.REQUESTS.labels(model=model, variant=route.variant.name, endpoint=endpoint, outcome=outcome,
                                pinned=str(route.pinned).lower(), epoch=router.epoch(model)).inc(rows)
