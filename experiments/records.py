"""What the data plane hands to the prediction log: one record per answered group of rows.

The request path only builds these (a few attribute stores per runtime call); expanding them into one
row per prediction, hashing user ids and encoding probabilities happen in the log's writer thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from experiments.store import PredictionRow, json_float32, user_key


# The two records of the request path are not frozen: a frozen dataclass sets each field through
# object.__setattr__, 1.7 against 0.5 µs to build an AnswerRecord, on every logged request.
@dataclass(slots=True)
class Deferred:
    """Log rows built only when iterated, in the log's writer thread (``PredictionLog.Rows``)."""

    count: int
    build: Callable[[], list[dict[str, Any]]]

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.build())


@dataclass(slots=True)
class AnswerRecord:
    """Rows of one logical model answered together by one variant."""

    served_at: float
    endpoint: str
    model: str
    variant: str
    model_tag: str
    pinned: bool
    epoch: str
    latency_ms: float
    api_key: str | None
    prediction_ids: Sequence[str]
    client_ids: Sequence[str | None]
    users: Sequence[tuple[str | None, int]]
    """Each request's user id and its number of rows, in row order (expanded in the writer thread)."""
    classes: Sequence[str]
    probabilities: np.ndarray
    predicted: np.ndarray
    """Each row's class index as the answer labelled it."""
    inputs: np.ndarray
    """The group's input rows, kept by the log only when drawn for drift sampling."""

    def rows(self, hash_users: bool) -> list[PredictionRow]:
        """One log row per prediction; ``hash_users`` keeps a SHA-256 of each user id instead of it.
        Built from Python lists, not NumPy: on the one-row groups of most requests NumPy's per-call cost
        was most of a row's."""
        return [PredictionRow(pid, cid, self.served_at, self.model, self.variant, self.model_tag, self.pinned,
                              self.epoch, user_key(uid, hash_users), request, self.api_key, self.endpoint,
                              self.classes[index], index, probabilities[index], json_float32(probabilities),
                              self.latency_ms)
                for pid, cid, (uid, request), index, probabilities in zip(
                    self.prediction_ids, self.client_ids, self._units(), self.predicted.tolist(),
                    self.probabilities.tolist())]

    def _units(self) -> list[tuple[str | None, str | None]]:
        """Per row, its request's user id, or (no user) the request's first prediction id."""
        units, start = [], 0
        for user, rows in self.users:
            request = None if user is not None else self.prediction_ids[start]
            units += [(user, request)] * rows
            start += rows
        return units

    def samples(self) -> list[dict[str, Any]]:
        """One input sample row per prediction (inputs flattened by the writer thread)."""
        return [{"prediction_id": pid, "served_at": self.served_at, "model": self.model, "variant": self.variant,
                 "model_tag": self.model_tag, "inputs": row} for pid, row in zip(self.prediction_ids, self.inputs)]


@dataclass(frozen=True, slots=True)
class ShadowRecord:
    """The shadow variant's answer to rows already answered live, under the live prediction ids."""

    variant: str
    model_tag: str
    prediction_ids: Sequence[str]
    classes: Sequence[str]
    probabilities: np.ndarray

    def rows(self) -> list[dict[str, Any]]:
        predicted = self.probabilities.argmax(axis=1)
        return [{"prediction_id": pid, "variant": self.variant, "model_tag": self.model_tag,
                 "label": self.classes[index], "label_index": int(index),
                 "probabilities": probabilities.tolist()}
                for pid, index, probabilities in zip(self.prediction_ids, predicted, self.probabilities)]


class Recorder(Protocol):
    """Where answers go after they are sent (the prediction log), without waiting for it."""

    def answer(self, records: Sequence[AnswerRecord]) -> None: ...

    def shadow(self, record: ShadowRecord) -> None: ...
