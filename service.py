"""bentoml-bundle: PyTorch, TensorFlow and scikit-learn models beside their ONNX twins, A/B routed.

This file only declares: the BentoML service, its native endpoints (thin: decode, data plane, answer)
and the protocols mounted beside them. What runs is underneath, one role a folder: ``protocols/``
(wire formats, the HTTP front door), ``serving/`` (the data plane, catalogue, batching),
``experiments/`` (routing, live weights, shadow, report), ``runtimes/`` and ``common/``. Adding a
protocol is one module in ``protocols/`` and one entry in ``PROTOCOLS``.
"""

from __future__ import annotations

import gc
import socket
from functools import partial
from pathlib import Path
from typing import Annotated, Literal

import bentoml
import numpy as np
from bentoml.validators import ContentType
from fastapi import FastAPI
from pydantic import Field
from starlette.responses import Response

from batch.task import JOBS_FOLDER, OUTPUT_MEDIA_TYPE, Jobs
from common import config
from common.errors import RequestError
from common.logs import setup_logging
from common.store import bentoml_home
from experiments.ledger import Ledger
from experiments.live import LiveExperiments
from experiments.repositorystore import RepositoryStore
from experiments.rollout import RolloutController
from experiments.shadow import Shadow
from protocols import (control, feedback, grpc_server, monitoring, native, oip, openapi, repository, rest, rollout,
                       tfserving, timeout)
from protocols.access import Access
from protocols.direct import DirectPath
from protocols.guard import Paths, RequestGuard, protected_routes
import runtimes
from serving import cache, prefork
from serving.batching import Batcher, Unbatched
from serving.catalog import Catalog, Classes
from serving.dataplane import DataPlane
from serving.repository import ModelRepository
from serving.types import BatchPrediction, ClientId, Prediction, UserId

CONFIG_PATH = config.config_path()
CONFIG = config.load(CONFIG_PATH)
CATALOG = Catalog(CONFIG)
Instance = native.instance_model(CONFIG, CATALOG.schemas)
BATCHING = CONFIG.batching
LIMITS = CONFIG.limits
ACCESS = Access()
"""API keys and rate limits: inert until the worker's configuration watcher applies config.yaml."""
GRPC_SOCKETS: list[socket.socket] = []
"""This worker's gRPC listeners when its parent made them before forking it (serving/prefork.py)."""

GC_THRESHOLDS = (20_000, 10, 10)
"""Young collections every 20,000 net allocations instead of 700. Chosen when BentoML's timeout
middleware kept a timer alive per request for ``service.timeout_s``: with Python's defaults, full
collections then walked those ~50-130k objects every ~70 requests, stalling the worker 25-110 ms each
time (one worker, 32 connections, p99 163 -> 44 ms with tracing off). With those timers gone
(``protocols/timeout.py``), 700 measured 0.98x the throughput with the same tail (8 interleaved
rounds, 2026-12-03): kept."""

PROTOCOLS = (control, feedback, monitoring, oip, repository, rollout, tfserving)
"""FastAPI routers mounted beside the native endpoints, each over the same data plane."""
app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
for protocol in PROTOCOLS:
    app.include_router(protocol.router)


@bentoml.service(
    name="bundle",
    service_class=openapi.DocumentedService,  # an OpenAPI document that validates: protocols/openapi.py
    # Forked workers: BentoML starts one process, which forks the configured number (serving/prefork.py).
    workers=1 if CONFIG.service.fork_workers else CONFIG.service.workers,
    traffic={"timeout": CONFIG.service.timeout_s},  # enforced by protocols/timeout.py; load shedding: protocols/guard.py
    logging={"access": {"enabled": CONFIG.service.access_log}},
    # Tracing off excludes every path: BentoML records a span per request even at sample rate 0.
    tracing={} if CONFIG.service.tracing else {"excluded_urls": [".*"]},
)
@bentoml.asgi_app(app, path="/")
class Bundle:
    def __init__(self) -> None:
        setup_logging()
        CATALOG.load_runtimes()
        queue = Batcher(CATALOG.runtimes, BATCHING) if BATCHING.enabled else Unbatched(CATALOG.runtimes)
        ledger = Ledger(CONFIG.store, CONFIG.store.resolved_url(Path(bentoml_home())),
                        Classes(CATALOG.schemas), CONFIG.monitoring)
        predictions = cache.from_config(CONFIG.cache)
        self.repository = ModelRepository(CATALOG, queue, RepositoryStore(ledger.store), CONFIG.repository,
                                          CONFIG.service.timeout_s, predictions)  # loads what the store wishes
        live = LiveExperiments(CONFIG_PATH, ledger, CATALOG.availability, CATALOG.declare,
                               listeners=[ACCESS.apply])
        ledger.drift.schedule(lambda: {model: live.router.experiment(model) for model in live.router.models},
                              also=ledger.refresh)
        self.rollouts = RolloutController(ledger, live, CONFIG.repository.controller_every_s)
        self.rollouts.schedule()  # acts in the one worker holding the lease "rollout"
        self.dataplane = DataPlane(CATALOG, live, queue,
                                   Shadow(CATALOG.runtimes, CONFIG.service.shadow_queue, ledger), LIMITS.max_rows,
                                   ledger, predictions)
        self.dataplane.checks["experiment_store"] = ledger.status
        self.repository.start(on_change=live.refresh, router=live.current)
        # torch, TensorFlow and the models leave ~800k long-lived objects: one full collection of them
        # stops the event loop for ~0.5 s. Frozen, they are never traversed again.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        self.grpc = (grpc_server.GrpcServer(CONFIG, self.dataplane, ACCESS, GRPC_SOCKETS) if CONFIG.grpc.enabled
                     else None)
        self.jobs = Jobs(CONFIG.batch, Path(bentoml_home()) / JOBS_FOLDER, CONFIG_PATH)

    @bentoml.on_startup
    async def start_grpc(self) -> None:
        """gRPC on this worker's event loop, beside its HTTP routes (protocols/grpc_server.py)."""
        if self.grpc is not None:
            await self.grpc.start()

    @bentoml.on_shutdown
    async def stop_grpc(self) -> None:
        if self.grpc is not None:
            await self.grpc.stop()

    @bentoml.on_shutdown
    def leave_repository(self) -> None:
        """This worker's heartbeat and model states leave the store (others stop waiting for it)."""
        self.repository.stop()

    @bentoml.api
    async def predict(
        self, instances: Annotated[list[Instance], Field(min_length=1, max_length=LIMITS.max_rows)],  # type: ignore[valid-type]
        ctx: bentoml.Context = None,  # type: ignore[assignment]
    ) -> Annotated[list[Prediction], ContentType("application/json")]:
        """One result per instance, in order; concurrent requests share batches per variant.

        The explicit content type is a speed fix: without it BentoML derives the media type of a list
        answer from its JSON schema, regenerated for every response (a third of a worker's time).
        """
        try:
            rows, headers = await native.predict(self.dataplane, instances)
        except RequestError as err:
            return native.error(err, ctx)  # type: ignore[return-value]
        ctx.response.headers.update(headers)
        return rows

    @bentoml.api
    async def predict_ndarray(
        self,
        model: str,
        inputs: np.ndarray,
        user_id: UserId | None = None,
        variant: str | None = None,
        ids: list[ClientId] | None = None,
        ctx: bentoml.Context = None,  # type: ignore[assignment]
    ) -> BatchPrediction:
        """The whole array goes to one variant; single-row requests still share batches."""
        try:
            answer, headers = await native.predict_ndarray(self.dataplane, model, inputs, user_id, variant, ids)
        except RequestError as err:
            return native.error(err, ctx)  # type: ignore[return-value]
        ctx.response.headers.update(headers)
        return answer

    @bentoml.api
    async def classify_image(
        self,
        image: Annotated[Path, Field(description="a PNG or JPEG of one digit, any size")],
        model: str = "digits",
        user_id: UserId | None = None,
        variant: str | None = None,
        id: ClientId | None = None,
        ctx: bentoml.Context = None,  # type: ignore[assignment]
    ) -> Prediction:
        """Preprocessed by common/images.py (grey, ink bright, resized to the model's 8x8 with Pillow)."""
        try:
            request = native.image_request(self.dataplane, image.read_bytes(), model, user_id, variant, id,
                                           LIMITS)
            [answer] = await self.dataplane.infer("classify_image", [request])
        except RequestError as err:
            return native.error(err, ctx)  # type: ignore[return-value]
        ctx.response.headers.update(rest.headers(answer))
        return answer.row(0)

    @bentoml.task
    async def score_file(
        self,
        file: Annotated[Path, Field(description="a table of one model's columns, its format from its name: "
                                                "*.csv, *.parquet, *.jsonl")],
        model: str,
        id_column: str | None = None,
        variant: str | None = None,
        output_format: Literal["parquet", "csv"] = "parquet",
        ctx: bentoml.Context = None,  # type: ignore[assignment]
    ) -> Annotated[Path, ContentType(OUTPUT_MEDIA_TYPE)]:
        """A batch job (``python -m batch`` in its own process, ``batch.max_jobs`` at a time): submit
        to /score_file/submit, poll /score_file/status, fetch the scored file from /score_file/get."""
        try:
            scored = await self.jobs.score(file, model, id_column, variant, output_format)
        except RequestError as err:
            return native.error(err, ctx)  # type: ignore[return-value]
        return Response(scored.content, media_type=OUTPUT_MEDIA_TYPE, headers=scored.headers())  # type: ignore[return-value]


# BentoML's timeout middleware kept a timer per request alive for timeout_s: ours drops it once answered.
timeout.install()

# The front door learns every protocol's paths (probes, forms, any content type) from the protocol,
# and the routes that take a bearer token from the app.
Bundle.add_asgi_middleware(RequestGuard, paths=Paths.union(*(p.GUARD for p in (native, *PROTOCOLS)),
                                                          protected_routes(app)),
                           max_body_bytes=LIMITS.max_body_bytes,
                           max_in_flight=CONFIG.service.in_flight_per_worker(),
                           retry_after_s=CONFIG.service.retry_after_s, access=ACCESS,
                           max_connection_age_s=CONFIG.service.max_connection_age_s,
                           direct=partial(DirectPath, mounted=app, endpoints=(oip.infer, tfserving.predict))
                           if CONFIG.service.direct_path else None)

# Variants come from config.yaml, not from class attributes, so their models are declared here:
# `bentoml build` packs exactly what the configuration serves.
Bundle.models.extend(bentoml.models.BentoModel(tag) for tag in CONFIG.model_tags())

# Last, so that every module above is imported once and shared: in BentoML's worker process (never in its
# main process, which imports this module only to read the declaration above), fork the workers.
if CONFIG.service.fork_workers and bentoml.server_context.worker_index is not None:
    GRPC_SOCKETS[:] = prefork.supervise(
        CONFIG.service.worker_count(), partial(runtimes.preload, CATALOG.models.values()),
        prefork.placement(CONFIG.service.worker_count(), CONFIG.service.pin_workers, CONFIG.service.intra_op_threads),
        partial(grpc_server.listen, CONFIG.grpc) if CONFIG.grpc.enabled else None)
