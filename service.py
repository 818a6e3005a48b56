"""bentoml-bundle: PyTorch, TensorFlow and scikit-learn models beside their ONNX twins, A/B routed.

The endpoints only parse, route and answer; runners predict, the router picks variants, and the
catalogue knows the models. Everything configurable is in config.yaml (bundle/config.py).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from fastapi import FastAPI
from pydantic import Field
from starlette.responses import JSONResponse

from bundle import config, images
from bundle.api_models import BatchPrediction, Prediction, UserId, instance_model
from bundle.batching import Batcher
from bundle.catalog import Catalog
from bundle.errors import RequestError
from bundle.logs import setup_logging
from bundle.router import Route, Router

CONFIG = config.load()
CATALOG = Catalog(CONFIG)
Instance = instance_model(CONFIG, CATALOG.schemas)
BATCHING = CONFIG.batching
LIMITS = CONFIG.limits

control = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


def _error(err: RequestError, ctx: bentoml.Context) -> JSONResponse:
    # BentoML copies the context's status onto any response of an API that takes a context.
    ctx.response.status_code = err.status
    return JSONResponse(err.body(), status_code=err.status)


@bentoml.service(
    name="bundle",
    workers=CONFIG.service.workers,
    traffic={"timeout": CONFIG.service.timeout_s, "max_concurrency": CONFIG.service.max_concurrency},
)
@bentoml.asgi_app(control, path="/")
class Bundle:
    def __init__(self) -> None:
        setup_logging()
        CATALOG.load_runners()
        self.router = Router(CONFIG.experiments)
        self.batcher = Batcher(CATALOG.runners, BATCHING)

    def _answer(self, model: str, route: Route, probabilities: np.ndarray) -> BatchPrediction:
        classes = CATALOG.schemas[model].classes
        return BatchPrediction(
            model=model,
            variant=route.variant.name,
            model_tag=route.variant.model,
            pinned=route.pinned,
            labels=[classes[i] for i in probabilities.argmax(axis=1)],
            probabilities=probabilities.tolist(),
        )

    @bentoml.api(batchable=True, max_batch_size=BATCHING.max_batch_size,
                 max_latency_ms=BATCHING.max_latency_ms)
    def predict(self, instances: list[Instance]) -> list[Prediction]:  # type: ignore[valid-type]
        """One result per instance, in order; concurrent requests share batches per variant."""
        routes = [self.router.route(i.model, i.user_id, i.variant) for i in instances]
        by_tag: dict[str, list[int]] = defaultdict(list)
        for index, route in enumerate(routes):
            by_tag[route.variant.model].append(index)
        results: list[Prediction] = [None] * len(instances)  # type: ignore[list-item]
        for tag, indices in by_tag.items():
            rows = np.concatenate([instances[i].row for i in indices])
            probabilities = CATALOG.runners[tag].predict(rows)
            for i, p in zip(indices, probabilities):
                results[i] = self._answer(instances[i].model, routes[i], p[None]).row(0)
        return results

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
            rows = self._rows(model, inputs)
            route = self.router.route(model, user_id, variant)
        except RequestError as err:
            return _error(err, ctx)  # type: ignore[return-value]
        probabilities = await self.batcher.predict(route.variant.model, rows)
        ctx.response.headers["X-Variant"] = route.variant.name
        return self._answer(model, route, probabilities)

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
            schema = self._schema(model)
            decoded = images.decode(image.read_bytes(), "image", LIMITS.max_image_bytes,
                                    LIMITS.max_image_pixels)
            rows = images.to_pixels(decoded, schema.input_shape)
            route = self.router.route(model, user_id, variant)
        except RequestError as err:
            return _error(err, ctx)  # type: ignore[return-value]
        probabilities = await self.batcher.predict(route.variant.model, rows)
        ctx.response.headers["X-Variant"] = route.variant.name
        return self._answer(model, route, probabilities).row(0)

    @control.get("/models")
    def models(self) -> dict[str, Any]:
        """The catalogue: logical models, variants, model tags, input schema, stored metadata."""
        return CATALOG.describe()

    def _schema(self, model: str):
        if model not in CATALOG.schemas:
            self.router.route(model)  # raises the 404 that names the served models
        return CATALOG.schemas[model]

    def _rows(self, model: str, inputs: np.ndarray) -> np.ndarray:
        return self._schema(model).batch(inputs, "inputs", LIMITS.max_rows)


# Variants come from config.yaml, not from class attributes, so their models are declared here:
# `bentoml build` packs exactly what the configuration serves.
Bundle.models.extend(bentoml.models.BentoModel(tag) for tag in CONFIG.model_tags())
