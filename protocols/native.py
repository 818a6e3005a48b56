"""The native wire format: JSON instances (``/predict``), one JSON array (``/predict_ndarray``) and an
image upload (``/classify_image``), decoded into data-plane requests.

The endpoints themselves are BentoML APIs on the service class (``service.py``): BentoML validates
their bodies, batches ``/predict`` and documents them. They answer the data plane's own models
(``serving/types.py``), so encoding is picking a row; errors go through ``protocols/rest.py``.
"""

from __future__ import annotations

from typing import Any

import bentoml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator
from starlette.responses import JSONResponse

from common.config import Config, Limits
from common.errors import RequestError
from common.schema import Schema
from protocols import images
from protocols.guard import Paths
from protocols.rest import error_response
from serving.dataplane import DataPlane
from serving.types import InferenceRequest, UserId

IMAGE_PATH = "/classify_image"
GUARD = Paths(multipart=frozenset({IMAGE_PATH}), fixed=frozenset({"/predict", "/predict_ndarray"}))


def instance_model(config: Config, schemas: dict[str, Schema]) -> type[BaseModel]:
    """The ``/predict`` instance, checked against the served models before it joins a batch.

    Validation must happen per request: once BentoML has merged requests into a batch, one bad row
    would fail every request in it.
    """

    class Instance(BaseModel):
        model_config = ConfigDict(extra="forbid")
        model: str = Field(description=f"one of {sorted(schemas)}")
        # One plain list, checked by the model's schema below: a union of list types made pydantic
        # report every branch (14 errors for one bad number) instead of the one that matters.
        inputs: list[Any] = Field(description="one row: a feature vector, or an 8x8 image as nested lists")
        user_id: UserId | None = Field(None, description="makes the A/B assignment sticky")
        variant: str | None = Field(None, description="pin a variant, bypassing the A/B split")
        _request: InferenceRequest = PrivateAttr()

        @model_validator(mode="after")
        def _fits_model(self) -> Instance:
            if self.model not in schemas:
                raise RequestError("model", f"unknown model {self.model!r}", ", ".join(sorted(schemas)))
            experiment = config.experiments[self.model]
            if self.variant is not None and experiment.variant(self.variant) is None:
                raise RequestError("variant", f"unknown variant {self.variant!r} of {self.model!r}",
                                   ", ".join(v.name for v in experiment.variants))
            row = schemas[self.model].batch(self.inputs, "inputs", max_rows=1)
            self._request = InferenceRequest(self.model, row, self.user_id, self.variant)
            return self

        @property
        def request(self) -> InferenceRequest:
            return self._request

    return Instance


def ndarray_request(dataplane: DataPlane, model: str, inputs: Any, user_id: str | None,
                    variant: str | None) -> InferenceRequest:
    """``/predict_ndarray``: the whole array is one request, for one variant."""
    return InferenceRequest(model, dataplane.rows(model, inputs, "inputs"), user_id, variant)


def image_request(dataplane: DataPlane, data: bytes, model: str, user_id: str | None, variant: str | None,
                  limits: Limits) -> InferenceRequest:
    """``/classify_image``: one uploaded picture as one row of an image model."""
    decoded = images.decode(data, "image", limits.max_image_bytes, limits.max_image_pixels)
    shape = dataplane.schema(model).input_shape
    if len(shape) < 2:
        raise RequestError("model", f"{model!r} takes feature vectors, not images",
                           ", ".join(m for m, s in dataplane.catalog.schemas.items() if len(s.input_shape) >= 2))
    return InferenceRequest(model, images.to_pixels(decoded, shape), user_id, variant)


def error(err: RequestError, ctx: bentoml.Context) -> JSONResponse:
    """A BentoML API's answer to ``err``. BentoML copies the context's status onto any response of an
    API that takes a context, so the status goes there too."""
    ctx.response.status_code = err.status
    return error_response(err)
