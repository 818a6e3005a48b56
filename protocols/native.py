"""The native wire format: JSON instances (``/predict``), one JSON array (``/predict_ndarray``) and an
image upload (``/classify_image``), decoded into data-plane requests.

The endpoints themselves are BentoML APIs on the service class (``service.py``): BentoML validates
their bodies, batches ``/predict`` and documents them. They answer the data plane's own models
(``serving/types.py``), so encoding is picking a row; errors go through ``protocols/rest.py``.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Sequence

import bentoml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator
from starlette.responses import JSONResponse

from common import images
from common.config import Config, Limits
from common.errors import RequestError
from common.schema import Schema
from protocols.guard import Paths
from protocols.rest import client_ids, error_response, headers
from serving.dataplane import DataPlane
from serving.types import BatchPrediction, ClientId, InferenceRequest, Prediction, UserId

IMAGE_PATH = "/classify_image"
JOB_PATH = "/score_file"
"""The batch task (``batch/task.py``): BentoML adds ``/submit``, ``/status``, ``/get``, ``/retry`` and
``/cancel`` to it; a job's upload is a form, ``/retry`` and ``/cancel`` take no body."""
GUARD = Paths(multipart=frozenset({IMAGE_PATH, JOB_PATH, f"{JOB_PATH}/submit"}),
              any_media=(f"{JOB_PATH}/retry", f"{JOB_PATH}/cancel"),
              fixed=frozenset({"/predict", "/predict_ndarray", *(f"{JOB_PATH}/{step}" for step in ("status", "get"))}),
              inference=("/predict", "/predict_ndarray", IMAGE_PATH, f"{JOB_PATH}(/submit|/retry)?"))


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
        id: ClientId | None = None
        _request: InferenceRequest | None = PrivateAttr(None)
        _error: RequestError | None = PrivateAttr(None)

        @model_validator(mode="after")
        def _fits_model(self) -> Instance:
            # Kept, not raised: BentoML answers a validator's error as pydantic's message alone, which
            # would drop the fields of ours (the expected shape, the feature names).
            try:
                self._request = self._decoded()
            except RequestError as err:
                self._error = err
            return self

        def _decoded(self) -> InferenceRequest:
            if self.model not in schemas:
                raise RequestError("model", f"unknown model {self.model!r}", ", ".join(sorted(schemas)))
            experiment = config.experiments[self.model]
            if self.variant is not None and experiment.variant(self.variant) is None:
                raise RequestError("variant", f"unknown variant {self.variant!r} of {self.model!r}",
                                   ", ".join(v.name for v in experiment.variants))
            row = schemas[self.model].batch(self.inputs, "inputs", max_rows=1)
            return InferenceRequest(self.model, row, self.user_id, self.variant,
                                    None if self.id is None else (self.id,))

        @property
        def request(self) -> InferenceRequest:
            """The decoded row, or the error that says why this instance does not fit (raised)."""
            if self._error is not None:
                raise self._error
            assert self._request is not None
            return self._request

    return Instance


def instance_requests(instances: Sequence[Any]) -> list[InferenceRequest]:
    """``/predict``: each instance's request, or the first misfit's error named from the body's top
    (``instances.3.inputs``)."""
    requests = []
    for index, instance in enumerate(instances):
        try:
            requests.append(instance.request)
        except RequestError as err:
            raise err.at(f"instances.{index}") from None
    return requests


async def predict(dataplane: DataPlane, instances: Sequence[Any]) -> tuple[list[Prediction], dict[str, str]]:
    """``/predict`` (the BentoML API and the direct path, ``protocols/direct.py``): one result per
    instance, in order, and the answer's headers; a RequestError names the instance at fault."""
    answers = await dataplane.infer("predict", instance_requests(instances))
    return [answer.row(0) for answer in answers], headers(answers[0]) if len(answers) == 1 else {}


async def predict_ndarray(dataplane: DataPlane, model: str, inputs: Any, user_id: str | None,
                          variant: str | None, ids: list[str] | None) -> tuple[BatchPrediction, dict[str, str]]:
    """``/predict_ndarray`` (the BentoML API and the direct path): the whole array is one request, for
    one variant; the answer and its headers."""
    rows = dataplane.rows(model, inputs, "inputs")
    [answer] = await dataplane.infer("predict_ndarray", [InferenceRequest(model, rows, user_id, variant,
                                                                          client_ids(ids, len(rows), "ids"))])
    return answer, headers(answer)


def image_request(dataplane: DataPlane, data: bytes, model: str, user_id: str | None, variant: str | None,
                  client_id: str | None, limits: Limits) -> InferenceRequest:
    """``/classify_image``: one uploaded picture as one row of an image model."""
    decoded = images.decode(data, "image", limits.max_image_bytes, limits.max_image_pixels)
    shape = dataplane.schema(model).input_shape
    if len(shape) < 2:
        raise RequestError("model", f"{model!r} takes feature vectors, not images",
                           ", ".join(m for m, s in dataplane.catalog.schemas.items() if len(s.input_shape) >= 2))
    return InferenceRequest(model, images.to_pixels(decoded, shape), user_id, variant,
                            None if client_id is None else (client_id,))


def error(err: RequestError, ctx: bentoml.Context) -> JSONResponse:
    """A BentoML API's answer to ``err``. BentoML copies the context's status onto any response of an
    API that takes a context, so the status goes there too."""
    ctx.response.status_code = err.status
    return error_response(err)
