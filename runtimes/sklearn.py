"""scikit-learn: a skops file, loading only scikit-learn and NumPy types.

skops refuses any type it is not told to trust; trusting exactly the sklearn/numpy types the file
names keeps a tampered file from running code of another module on load.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import numpy as np
from threadpoolctl import threadpool_limits

from runtimes.base import Runtime

TRUSTED_PREFIXES = ("sklearn.", "numpy.")
ARRAY_API_TORCH = "sklearn.externals.array_api_compat.torch"
"""scikit-learn's array-API adapter for torch: importing it imports torch."""


def _import_skops() -> ModuleType:
    """``skops.io``, without torch. Imported, skops lists the types it trusts by walking every scikit-learn
    package (``sklearn.utils.all_estimators``), and the walk imports ``ARRAY_API_TORCH``, so torch: +259 MiB
    of anonymous memory and ~4 s in every worker or batch job, whether or not it serves a torch model
    (``python -m bench.memory``). A None in ``sys.modules`` makes that one import fail, which the walk
    skips like any package that does not import; afterwards the adapter is importable again."""
    blocked = ARRAY_API_TORCH not in sys.modules
    if blocked:
        sys.modules[ARRAY_API_TORCH] = None  # type: ignore[assignment]
    try:
        return importlib.import_module("skops.io")
    finally:
        if blocked and sys.modules.get(ARRAY_API_TORCH, ARRAY_API_TORCH) is None:
            del sys.modules[ARRAY_API_TORCH]


skops_io = _import_skops()


class SklearnRuntime(Runtime):
    runtime = "sklearn"

    def load(self) -> None:
        untrusted = skops_io.get_untrusted_types(file=self.path)
        refused = [t for t in untrusted if not t.startswith(TRUSTED_PREFIXES)]
        if refused:
            raise ValueError(f"{self.tag}: refusing to load types outside scikit-learn/NumPy: {refused}")
        self._pipeline = skops_io.load(self.path, trusted=untrusted)
        if hasattr(self._pipeline[-1], "n_jobs"):
            self._pipeline[-1].n_jobs = self.threads
        threadpool_limits(self.threads)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self._pipeline.predict_proba(batch).astype(np.float32, copy=False)


RUNTIME = SklearnRuntime
