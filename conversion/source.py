"""A stored source model, loaded the way its runtime loads it, and exported to ONNX from that object.

Conversion keeps these few lines per framework instead of importing ``runtimes/``, so it checks twins
against the source as served while the service code changes independently.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from collections.abc import Callable

import bentoml
import numpy as np
import onnx

from common import store

INPUT = "input"
PROBABILITIES = "probabilities"
OPSET = 18
THREADS = 1
"""Every runtime runs on one thread during conversion, so that latencies compare like with like."""

_LOADERS = {"torch": "conversion.from_torch", "tf": "conversion.from_tf", "sklearn": "conversion.from_sklearn"}


@dataclass(frozen=True)
class Source:
    model: bentoml.Model
    predict: Callable[[np.ndarray], np.ndarray]
    export: Callable[[], onnx.ModelProto]
    exporter: str
    libraries: tuple[str, ...]


def is_source(model: bentoml.Model) -> bool:
    return "twin_of" not in model.info.labels and model.info.labels.get("framework") in _LOADERS


def load(model: bentoml.Model) -> Source:
    """Import only the framework this model needs: TensorFlow and torch each take seconds to load. A
    source whose files changed since it was stored is refused (``store.IntegrityError``): its twins
    would record fresh hashes of whatever it became."""
    store.verify(model)
    return importlib.import_module(_LOADERS[model.info.labels["framework"]]).load(model)
