"""bentoml-bundle: PyTorch, TensorFlow and scikit-learn models beside their ONNX twins, A/B routed.

The endpoints parse, route and answer; runners predict, the router picks variants, the catalogue
knows the models, and config.yaml (bundle/config.py) holds every setting.
"""

from __future__ import annotations

import gc
import hmac
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from bentoml.validators import ContentType
from fastapi import FastAPI, Header
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

from bundle import config, images, metrics, oip, report, tfserving
from bundle.api_models import BatchPrediction, Prediction, UserId, instance_model
from bundle.batching import Batcher, Unbatched
from bundle.catalog import Catalog
from bundle.config import Variant, Weight
from bundle.errors import RequestError
from bundle.experiments import LiveExperiments
from bundle.guard import RequestGuard
from bundle.logs import setup_logging
from bundle.router import Route, Router
from bundle.schema import Schema
from bundle.shadow import Shadow

ADMIN_TOKEN_ENV = "BUNDLE_ADMIN_TOKEN"
CONFIG_PATH = config.config_path()
CONFIG = config.load(CONFIG_PATH)
CATALOG = Catalog(CONFIG)
Instance = instance_model(CONFIG, CATALOG.schemas)
BATCHING = CONFIG.batching
LIMITS = CONFIG.limits

control = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
control.include_router(oip.router)
control.include_router(tfserving.router)


class ExperimentChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weights: dict[str, Weight] | None = None
    shadow: Variant | None = Field(None, description="null removes the shadow; leave out to keep it")


def _error(err: RequestError, ctx: bentoml.Context | None = None) -> JSONResponse:
    if ctx is not None:  # BentoML copies the context's status onto any response of an API with a context
        ctx.response.status_code = err.status
    return JSONResponse(err.body(), status_code=err.status)


def _refuse_admin(authorization: str | None) -> JSONResponse | None:
    token = os.environ.get(ADMIN_TOKEN_ENV)
    if not token:
        return JSONResponse({"error": f"admin endpoints are disabled: set {ADMIN_TOKEN_ENV} to enable them"},
                            status_code=403)
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        return JSONResponse({"error": "authorization: a valid 'Bearer <token>' is required",
                             "field": "Authorization"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})
    return None


@bentoml.service(
    name="bundle",
    workers=CONFIG.service.workers,
    traffic={"timeout": CONFIG.service.timeout_s},  # load shedding: bundle/guard.py
    logging={"access": {"enabled": CONFIG.service.access_log}},
)
@bentoml.asgi_app(control, path="/")
class Bundle:
    def __init__(self) -> None:
        setup_logging()
        CATALOG.load_runners()
        self.live = LiveExperiments(CONFIG_PATH, set(CATALOG.runners))
        self.batcher = Batcher(CATALOG.runners, BATCHING) if BATCHING.enabled else Unbatched(CATALOG.runners)
        self.shadow = Shadow(CATALOG.runners, CONFIG.service.shadow_queue)
        # torch, TensorFlow and the models leave ~800k long-lived objects: one full collection of them
        # stops the event loop for ~0.5 s. Frozen, they are never traversed again.
        gc.collect()
        gc.freeze()

    def _answer(self, endpoint: str, model: str, route: Route, router: Router, rows: np.ndarray,
                probabilities: np.ndarray) -> BatchPrediction:
        """Label the answer, count it, and hand a copy to the shadow, after the live result exists."""
        classes = CATALOG.schemas[model].classes
        predicted = probabilities.argmax(axis=1)
        labels = [classes[i] for i in predicted]
        variant = route.variant.name
        self._count(endpoint, model, route, router, "ok", len(rows))
        for label, count in Counter(labels).items():
            metrics.LABELS.labels(model=model, variant=variant, label=label).inc(count)
        shadow = router.experiment(model).shadow
        if shadow is not None:
            self.shadow.submit(model, shadow, rows, predicted)
        # Our own values, already of the declared types: constructed without a second validation.
        return BatchPrediction.model_construct(model=model, variant=variant, model_tag=route.variant.model,
                                               pinned=route.pinned, labels=labels,
                                               probabilities=probabilities.tolist())

    @staticmethod
    def _count(endpoint: str, model: str, route: Route, router: Router, outcome: str, rows: int) -> None:
        metrics.REQUESTS.labels(model=model, variant=route.variant.name, endpoint=endpoint, outcome=outcome,
                                pinned=str(route.pinned).lower(), epoch=router.epoch(model)).inc(rows)

    @bentoml.api(batchable=BATCHING.enabled, max_batch_size=BATCHING.max_batch_size,
                 max_latency_ms=BATCHING.max_latency_ms)
    def predict(
        self, instances: Annotated[list[Instance], Field(min_length=1, max_length=LIMITS.max_rows)]  # type: ignore[valid-type]
    ) -> Annotated[list[Prediction], ContentType("application/json")]:
        """One result per instance, in order; concurrent requests share batches per variant.

        The explicit content type is a speed fix: without it BentoML derives the media type of a list
        answer from its JSON schema, regenerated for every response (a third of a worker's time).
        """
        router = self.live.router
        routes = [router.route(i.model, i.user_id, i.variant) for i in instances]
        groups: dict[tuple[str, Route], list[int]] = defaultdict(list)
        for index, (instance, route) in enumerate(zip(instances, routes)):
            groups[(instance.model, route)].append(index)
        results: list[Prediction] = [None] * len(instances)  # type: ignore[list-item]
        for (model, route), indices in groups.items():
            rows = np.concatenate([instances[i].row for i in indices])
            try:
                probabilities = CATALOG.runners[route.variant.model].infer(rows)
            except Exception:  # counted per variant, then BentoML fails this batch with a 500
                self._count("predict", model, route, router, "error", len(rows))
                raise
            answer = self._answer("predict", model, route, router, rows, probabilities)
            for position, index in enumerate(indices):
                results[index] = answer.row(position)
        return results

    async def infer(self, endpoint: str, model: str, rows: np.ndarray, user_id: str | None = None,
                    variant: str | None = None) -> BatchPrediction:
        """Route validated rows, batch them with concurrent requests for the same variant, answer.

        Every endpoint but ``/predict`` (batched by BentoML itself) and every protocol goes through here.
        """
        router = self.live.router
        route = router.route(model, user_id, variant)
        try:
            probabilities = await self.batcher.predict(route.variant.model, rows)
        except Exception:  # counted per variant, then BentoML answers 500 (or 503 when shedding)
            self._count(endpoint, model, route, router, "error", len(rows))
            raise
        return self._answer(endpoint, model, route, router, rows, probabilities)

    def schema(self, model: str) -> Schema:
        """The input contract of a logical model, or the 404 that names the served models."""
        self.live.router.experiment(model)  # the 404 that names the served models
        return CATALOG.schemas[model]

    def rows(self, model: str, inputs: Any, field: str) -> np.ndarray:
        """``inputs`` as rows of ``model`` within ``limits.max_rows``, or the 4xx that names ``field``."""
        return self.schema(model).batch(inputs, field, LIMITS.max_rows)

    @bentoml.api
    async def predict_ndarray(
        self,
        model: str,
        inputs: np.ndarray,
        user_id: UserId | None = None,
        variant: str | None = None,
        ctx: bentoml.Context = None,  # type: ignore[assignment]
    ) -> BatchPrediction:
        """The whole array goes to one variant; single-row requests still share batches."""
        try:
            rows = self.rows(model, inputs, "inputs")
            answer = await self.infer("predict_ndarray", model, rows, user_id, variant)
        except RequestError as err:
            return _error(err, ctx)  # type: ignore[return-value]
        ctx.response.headers["X-Variant"] = answer.variant
        return answer

    @bentoml.api
    async def classify_image(
        self,
        image: Annotated[Path, Field(description="a PNG or JPEG of one digit, any size")],
        model: str = "digits",
        user_id: UserId | None = None,
        variant: str | None = None,
        ctx: bentoml.Context = None,  # type: ignore[assignment]
    ) -> Prediction:
        """Preprocessed with the torchvision transforms of bundle/images.py."""
        try:
            decoded = images.decode(image.read_bytes(), "image", LIMITS.max_image_bytes,
                                    LIMITS.max_image_pixels)
            shape = self.schema(model).input_shape
            if len(shape) < 2:
                raise RequestError("model", f"{model!r} takes feature vectors, not images",
                                   ", ".join(m for m, s in CATALOG.schemas.items() if len(s.input_shape) >= 2))
            rows = images.to_pixels(decoded, shape)
            answer = await self.infer("classify_image", model, rows, user_id, variant)
        except RequestError as err:
            return _error(err, ctx)  # type: ignore[return-value]
        ctx.response.headers["X-Variant"] = answer.variant
        return answer.row(0)

    @control.get("/models")
    def models(self) -> dict[str, Any]:
        """The catalogue: logical models, variants, model tags, input schema, stored metadata."""
        return CATALOG.describe()

    @control.get("/experiments")
    def experiments(self) -> dict[str, Any]:
        """Configuration in force, live rows per variant, configured against observed share."""
        router, samples = self.live.router, metrics.collect()
        out = {}
        for model in router.models:
            experiment = router.experiment(model)
            shares = report.traffic(experiment, router.epoch(model), samples)
            out[model] = {
                "salt": experiment.salt,
                "epoch": router.epoch(model),
                "variants": [{"name": v.name, "model_tag": v.model, "weight": v.weight, **shares[v.name]}
                             for v in experiment.variants],
                "shadow": experiment.shadow.model_dump() if experiment.shadow else None,
            }
        return {"experiments": out}

    @control.get("/experiments/{model}/report")
    def experiment_report(self, model: str) -> Any:
        """Traffic against weights with a sample-ratio-mismatch test, latency, labels, shadow."""
        router = self.live.router
        try:
            experiment = router.experiment(model)
        except RequestError as err:
            return _error(err)
        return report.build(model, experiment, router.epoch(model), metrics.collect())

    @control.put("/experiments/{model}")
    def change_experiment(self, model: str, change: ExperimentChange,
                          authorization: Annotated[str | None, Header()] = None) -> Any:
        """Admin: new weights and/or shadow, applied by every worker within a second, kept on restart."""
        refused = _refuse_admin(authorization)
        if refused is not None:
            return refused
        shadow = change.shadow.model_dump() if change.shadow else (None if "shadow" in change.model_fields_set
                                                                   else ...)
        try:
            experiment = self.live.update(model, change.weights, shadow)
        except RequestError as err:
            return _error(err)
        return {"model": model, "epoch": self.live.router.epoch(model), **experiment.model_dump()}


Bundle.add_asgi_middleware(RequestGuard, max_body_bytes=LIMITS.max_body_bytes,
                           max_in_flight=CONFIG.service.in_flight_per_worker(),
                           retry_after_s=CONFIG.service.retry_after_s)

# Variants come from config.yaml, not from class attributes, so their models are declared here:
# `bentoml build` packs exactly what the configuration serves.
Bundle.models.extend(bentoml.models.BentoModel(tag) for tag in CONFIG.model_tags())
