"""scikit-learn: a skops file, loading only scikit-learn and NumPy types.

skops refuses any type it is not told to trust; trusting exactly the sklearn/numpy types the file
names keeps a tampered file from running code of another module on load.
"""

from __future__ import annotations

import numpy as np
import skops.io
from threadpoolctl import threadpool_limits

from runtimes.base import Runtime

TRUSTED_PREFIXES = ("sklearn.", "numpy.")


class SklearnRuntime(Runtime):
    runtime = "sklearn"

    def load(self) -> None:
        untrusted = skops.io.get_untrusted_types(file=self.path)
        refused = [t for t in untrusted if not t.startswith(TRUSTED_PREFIXES)]
        if refused:
            raise ValueError(f"{self.tag}: refusing to load types outside scikit-learn/NumPy: {refused}")
        self._pipeline = skops.io.load(self.path, trusted=untrusted)
        if hasattr(self._pipeline[-1], "n_jobs"):
            self._pipeline[-1].n_jobs = self.threads
        threadpool_limits(self.threads)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self._pipeline.predict_proba(batch).astype(np.float32, copy=False)


RUNTIME = SklearnRuntime
