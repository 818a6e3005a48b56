"""What goes into the data plane and what comes out, whatever the protocol.

The answers are pydantic models because the native endpoints return them as they are (BentoML
validates and documents them); every other protocol encodes them into its own shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np
from pydantic import BaseModel, Field

UserId = Annotated[str, Field(min_length=1, max_length=256)]
ClientId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$",
                                description="your own id for this row: echoed, and accepted by POST /feedback")]


@dataclass(frozen=True)
class InferenceRequest:
    """Validated rows of one logical model, as every protocol decodes them."""

    model: str
    rows: np.ndarray
    user_id: str | None = None
    variant: str | None = None
    ids: tuple[str | None, ...] | None = None
    """The client's own id per row (echoed, and accepted by ``POST /feedback`` as ``id``)."""


class Prediction(BaseModel):
    prediction_id: str = Field(description="the id to send outcomes for to POST /feedback")
    id: str | None = Field(None, description="the client's own id of this row, echoed")
    model: str
    variant: str
    model_tag: str
    pinned: bool = Field(description="the request chose the variant instead of the A/B split")
    label: str
    probabilities: list[float]


class BatchPrediction(BaseModel):
    prediction_ids: list[str] = Field(description="one per row, for POST /feedback")
    ids: list[str | None] | None = Field(None, description="the client's own ids, echoed")
    model: str
    variant: str
    model_tag: str
    pinned: bool
    labels: list[str]
    probabilities: list[list[float]]

    def row(self, index: int) -> Prediction:
        return Prediction.model_construct(prediction_id=self.prediction_ids[index],
                                          id=self.ids[index] if self.ids else None, model=self.model,
                                          variant=self.variant, model_tag=self.model_tag, pinned=self.pinned,
                                          label=self.labels[index], probabilities=self.probabilities[index])

    def rows(self, start: int, stop: int, ids: tuple[str | None, ...] | None) -> BatchPrediction:
        """The answer of rows ``start:stop`` (whose client ids are ``ids``), for a request that shared a
        runtime call with others."""
        return BatchPrediction.model_construct(prediction_ids=self.prediction_ids[start:stop],
                                               ids=list(ids) if ids else None, model=self.model,
                                               variant=self.variant, model_tag=self.model_tag,
                                               pinned=self.pinned, labels=self.labels[start:stop],
                                               probabilities=self.probabilities[start:stop])
