"""One module per runtime behind one small interface (``runtimes.base.Runtime``): load a stored model
by tag, predict a batch.

A stored model's ``runtime`` label names its module here (``torch`` -> ``runtimes/torch.py``), which
is imported only when a model of that runtime is loaded: a service without TensorFlow models never
imports TensorFlow. Adding a runtime is adding a module that defines ``RUNTIME``; nothing else lists
them.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable

import bentoml

from common import store
from common.logs import get_logger
from runtimes.base import Runtime

NOT_RUNTIMES = frozenset({"base"})
log = get_logger(__name__)


def available() -> list[str]:
    """The runtime labels this package serves: its module names, found without importing them."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in NOT_RUNTIMES)


def _runtime_class(model: bentoml.Model) -> type[Runtime]:
    label = model.info.labels.get("runtime", "")
    if label not in available():
        raise ValueError(f"model {model.tag} has runtime label {label!r}; expected one of {available()}")
    return importlib.import_module(f"{__name__}.{label}").RUNTIME


def load_runtime(model: bentoml.Model, threads: int = 1) -> Runtime:
    """A stored model, its files checked against the hashes recorded when it was stored (a
    ``store.IntegrityError`` names the file that differs), then loaded by the runtime its ``runtime``
    label names."""
    runtime = _runtime_class(model)(model, threads)
    runtime.load()
    return runtime


def preload(models: Iterable[bentoml.Model]) -> None:
    """Import every runtime ``models`` use, and what loading each of them imports, without loading them
    (``Runtime.preload``). A model that cannot be preloaded is skipped: the worker's own load refuses
    and reports it, and the other models are served."""
    for model in models:
        try:
            _runtime_class(model).preload(store.model_file(model))
        except Exception:  # a bad label, a missing library, a damaged file: whatever the model's fault
            log.warning("model not preloaded; its workers load it and report why",
                        extra={"model_tag": str(model.tag)}, exc_info=True)


__all__ = ["Runtime", "available", "load_runtime", "preload"]
