"""The one serving path under every protocol: route -> batch -> runtime -> answer -> count.

Protocols decode their wire format into :class:`InferenceRequest` and encode the
:class:`BatchPrediction` they get back; nothing here knows about HTTP, JSON or tensors on the wire.
Every request takes the same steps: routed, queued with concurrent requests for the same variant
(``serving/batching.py``), run, answered, counted, copied to the shadow.

Errors are protocol-free (``common/errors.py``); each transport maps them to responses once.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from typing import Any
from collections.abc import Callable, Sequence

import numpy as np

from common import metrics
from common.ids import Ids
from common.logs import API_KEY, tag_with_request
from common.schema import Schema
from experiments.ledger import Ledger
from experiments.live import LiveExperiments
from experiments.records import AnswerRecord
from experiments.router import Route, Router
from experiments.shadow import Shadow
from serving.batching import Batcher, Unbatched
from serving.cache import PredictionCache
from serving.catalog import Catalog
from serving.types import BatchPrediction, InferenceRequest


class DataPlane:
    def __init__(self, catalog: Catalog, live: LiveExperiments, queue: Batcher | Unbatched, shadow: Shadow,
                 max_rows: int, ledger: Ledger, cache: PredictionCache | None = None):
        """``cache``: the optional prediction cache (``serving/cache.py``); None: every row is queued."""
        self.catalog = catalog
        self.live = live
        self._queue = queue
        self._shadow = shadow
        self._max_rows = max_rows
        self.ledger = ledger
        self._cache = cache
        self._prediction_ids = Ids()
        self.checks: dict[str, Callable[[], dict[str, Any]]] = {"models": self._models_check}
        """Readiness checks by name (see :meth:`health`); others register theirs here."""

    def health(self) -> dict[str, Any]:
        """This worker's readiness, as ``/readyz`` answers it: every check's report under its name.

        Each check returns ``{"ok": bool, ...detail}``, and may say ``"degraded": true``. Any check not
        ``ok`` (or raising) makes the worker not ready: ``/readyz`` answers 503 and a load balancer
        sends it nothing. A check that is ``ok`` but degraded keeps 200, its detail saying what is
        missing: the worker still serves, with less (a variant that failed to load while its model
        answers through the others, or a model that cannot answer while others can)."""
        reports: dict[str, dict[str, Any]] = {}
        for name, check in self.checks.items():
            try:
                reports[name] = check()
            except Exception as err:  # a broken check is a failed check, reported, never a 500
                reports[name] = {"ok": False, "error": f"check failed: {err!r}"}
        return {"ready": all(r["ok"] for r in reports.values()),
                "degraded": any(r.get("degraded", False) for r in reports.values()), "checks": reports}

    def _models_check(self) -> dict[str, Any]:
        """Ready while at least one model can answer; degraded when a model failed to load."""
        router = self.router
        unavailable = {m: reason for m in router.models if (reason := router.unavailable(m))}
        unrecorded = sorted(t for t, r in self.catalog.runtimes.items() if r.integrity.status == "unrecorded")
        return {"ok": len(unavailable) < len(router.models), "degraded": bool(self.catalog.failures),
                "failed": self.catalog.failures, "unavailable": unavailable,
                "integrity_unrecorded": unrecorded}

    @property
    def router(self) -> Router:
        """The weights in force; a change swaps in a new router, so read it once per request."""
        return self.live.router

    def schema(self, model: str) -> Schema:
        """The input contract of a logical model, or the 404 that names the served models."""
        self.router.experiment(model)
        return self.catalog.schemas[model]

    def rows(self, model: str, inputs: Any, field: str, batched: bool = False) -> np.ndarray:
        """``inputs`` as rows of ``model`` within ``limits.max_rows``, or the 4xx that names ``field``
        (``batched``: a list of rows only, never one row alone)."""
        return self.schema(model).batch(inputs, field, self._max_rows, batched)

    async def infer(self, endpoint: str, requests: Sequence[InferenceRequest]) -> list[BatchPrediction]:
        """One answer per request, in order. Requests are routed, then each variant's rows join that
        variant's batch queue together, batched with concurrent requests."""
        router = self.router
        started = time.perf_counter()
        groups: dict[tuple[str, Route], list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[(request.model, router.route(request.model, request.user_id, request.variant))].append(index)
        answers: list[BatchPrediction] = [None] * len(requests)  # type: ignore[list-item]
        records: list[AnswerRecord] = []

        async def run(model: str, route: Route, indices: list[int]) -> None:
            rows = requests[indices[0]].rows if len(indices) == 1 else np.concatenate(
                [requests[i].rows for i in indices])
            try:
                if self._cache is None:
                    probabilities = await self._queue.predict(route.variant.model, rows)
                else:  # cached rows answered here, only the others queued
                    probabilities = await self._cache.predict(self._queue.predict, route.variant.model, rows)
            except Exception as err:  # counted per variant, then the transport answers 500 (or 503 when shedding)
                self._count(endpoint, model, route, router, "error", len(rows))
                tag_with_request(err)
                raise
            group = [requests[i] for i in indices]
            answer = self._answer(endpoint, model, route, router, group, rows, probabilities, started, records)
            if len(indices) == 1:
                answers[indices[0]] = answer
                return
            start = 0
            for index in indices:
                stop = start + len(requests[index].rows)
                answers[index] = answer.rows(start, stop, requests[index].ids)
                start = stop

        if len(groups) == 1:
            await run(*next(iter(groups)), next(iter(groups.values())))
        else:
            await asyncio.gather(*(run(model, route, indices) for (model, route), indices in groups.items()))
        if records:  # one hand-over per request: the log never holds one variant's part of it without the other's
            self.ledger.answer(records)
        return answers

    def _answer(self, endpoint: str, model: str, route: Route, router: Router, group: list[InferenceRequest],
                rows: np.ndarray, probabilities: np.ndarray, started: float,
                records: list[AnswerRecord]) -> BatchPrediction:
        """Label the answer, give every row an id, count it, add its log record to ``records`` and hand a
        copy to the shadow, after the live result exists."""
        classes = self.catalog.schemas[model].classes
        predicted = probabilities.argmax(axis=1)
        labels = [classes[i] for i in predicted]
        variant = route.variant.name
        ids = self._prediction_ids.take(len(rows))
        self._count(endpoint, model, route, router, "ok", len(rows))
        for label, count in Counter(labels).items():
            metrics.LABELS.labels(model=model, variant=variant, label=label).inc(count)
        client_ids = ([c for r in group for c in (r.ids or (None,) * len(r.rows))]
                      if any(r.ids for r in group) else None)
        if self.ledger.logging:
            records.append(AnswerRecord(
                served_at=time.time(), endpoint=endpoint, model=model, variant=variant,
                model_tag=route.variant.model, pinned=route.pinned, epoch=router.epoch(model),
                latency_ms=(time.perf_counter() - started) * 1000, api_key=API_KEY.get(), prediction_ids=ids,
                client_ids=client_ids or (None,) * len(rows),
                users=[(r.user_id, len(r.rows)) for r in group], classes=classes, probabilities=probabilities,
                predicted=predicted, inputs=rows))
        shadow = router.experiment(model).shadow
        if shadow is not None and shadow.model in self.catalog.runtimes:  # a shadow that failed to load: /readyz
            self._shadow.submit(model, shadow, rows, predicted, ids, classes)
        # Our own values, already of the declared types: constructed without a second validation.
        return BatchPrediction.model_construct(prediction_ids=ids, ids=client_ids, model=model, variant=variant,
                                               model_tag=route.variant.model, pinned=route.pinned,
                                               labels=labels, probabilities=probabilities.tolist())

    @staticmethod
    def _count(endpoint: str, model: str, route: Route, router: Router, outcome: str, rows: int) -> None:
        metrics.REQUESTS.labels(model=model, variant=route.variant.name, endpoint=endpoint, outcome=outcome,
                                pinned=str(route.pinned).lower(), epoch=router.epoch(model)).inc(rows)
