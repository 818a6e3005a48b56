"""Request and response bodies of the native endpoints (pydantic, so BentoML validates them)."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from bundle.config import Config
from bundle.errors import RequestError
from bundle.schema import Schema

UserId = Annotated[str, Field(min_length=1, max_length=256)]


class Prediction(BaseModel):
    model: str
    variant: str
    model_tag: str
    pinned: bool = Field(description="the request chose the variant instead of the A/B split")
    label: str
    probabilities: list[float]


class BatchPrediction(BaseModel):
    model: str
    variant: str
    model_tag: str
    pinned: bool
    labels: list[str]
    probabilities: list[list[float]]

    def row(self, index: int) -> Prediction:
        return Prediction.model_construct(model=self.model, variant=self.variant, model_tag=self.model_tag,
                                          pinned=self.pinned, label=self.labels[index],
                                          probabilities=self.probabilities[index])


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
        _row: np.ndarray = PrivateAttr()

        @model_validator(mode="after")
        def _fits_model(self) -> Instance:
            if self.model not in schemas:
                raise RequestError("model", f"unknown model {self.model!r}", ", ".join(sorted(schemas)))
            experiment = config.experiments[self.model]
            if self.variant is not None and experiment.variant(self.variant) is None:
                raise RequestError("variant", f"unknown variant {self.variant!r} of {self.model!r}",
                                   ", ".join(v.name for v in experiment.variants))
            self._row = schemas[self.model].batch(self.inputs, "inputs", max_rows=1)
            return self

        @property
        def row(self) -> np.ndarray:
            return self._row

    return Instance
