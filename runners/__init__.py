"""One runner per runtime behind one interface: load a stored model by tag, predict a batch.

The runtime is read from the stored model's ``runtime`` label, and its module is imported only when
a model of that runtime is loaded, so a service without TensorFlow models never imports TensorFlow.
"""

from __future__ import annotations

import importlib

from bundle import store
from runners.base import Runner

_MODULES = {
    "torch": "runners.torch_runner",
    "tensorflow": "runners.tensorflow_runner",
    "sklearn": "runners.sklearn_runner",
    "onnxruntime": "runners.onnx_runner",
}


def load_runner(model_tag: str, threads: int = 1) -> Runner:
    model = store.get(model_tag)
    runtime = model.info.labels.get("runtime", "")
    if runtime not in _MODULES:
        raise ValueError(f"model {model_tag!r} has runtime label {runtime!r}; expected one of {sorted(_MODULES)}")
    runner_class: type[Runner] = importlib.import_module(_MODULES[runtime]).RUNNER
    runner = runner_class(model, threads)
    runner.load()
    return runner


__all__ = ["Runner", "load_runner"]
