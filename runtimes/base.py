"""The runtime interface (after MLServer's runtimes): ``load`` once, then ``predict`` batches."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from pathlib import Path

import bentoml
import numpy as np

from common import store
from common.metrics import BATCH_ROWS, LATENCY
from common.schema import Schema


class Runtime(ABC):
    runtime: str

    def __init__(self, model: bentoml.Model, threads: int):
        """Refuses (``store.IntegrityError``) a model whose files changed since they were stored."""
        self.integrity = store.verify(model)
        self.tag = str(model.tag)
        self.labels = dict(model.info.labels)
        self.metadata = dict(model.info.metadata)
        self.schema = Schema.from_metadata(self.metadata)
        self.path: Path = store.model_file(model)
        self.threads = threads
        self._latency = LATENCY.labels(model_tag=self.tag)
        self._rows = BATCH_ROWS.labels(model_tag=self.tag)

    @classmethod
    def preload(cls, path: Path) -> None:
        """Import what loading the model at ``path`` imports, starting no thread: a parent does this
        before forking workers, which then share those modules' memory (``serving/prefork.py``). The
        runtime's own module is imported already; most runtimes need nothing more."""

    @abstractmethod
    def load(self) -> None:
        """Read the model file and prepare the runtime (threads, compiled function, session)."""

    @abstractmethod
    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities, float32 (N, classes), for a float32 batch of the schema's shape."""

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """``predict``, measured: every serving path calls this, so every call is in the metrics."""
        started = time.perf_counter()
        probabilities = self.predict(batch)
        self._latency.observe(time.perf_counter() - started)
        self._rows.observe(len(batch))
        return probabilities
