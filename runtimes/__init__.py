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

import bentoml

from runtimes.base import Runtime

NOT_RUNTIMES = frozenset({"base"})


def available() -> list[str]:
    """The runtime labels this package serves: its module names, found without importing them."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in NOT_RUNTIMES)


def load_runtime(model: bentoml.Model, threads: int = 1) -> Runtime:
    """A stored model, its files checked against the hashes recorded when it was stored (a
    ``store.IntegrityError`` names the file that differs), then loaded by the runtime its ``runtime``
    label names."""
    label = model.info.labels.get("runtime", "")
    if label not in available():
        raise ValueError(f"model {model.tag} has runtime label {label!r}; expected one of {available()}")
    runtime_class: type[Runtime] = importlib.import_module(f"{__name__}.{label}").RUNTIME
    runtime = runtime_class(model, threads)
    runtime.load()
    return runtime


__all__ = ["Runtime", "available", "load_runtime"]
