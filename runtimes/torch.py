"""PyTorch: a ``torch.export`` program, loaded without unpickling arbitrary objects."""

from __future__ import annotations

import numpy as np
import torch

from runtimes.base import Runtime


class TorchRuntime(Runtime):
    runtime = "torch"

    def load(self) -> None:
        torch.set_num_threads(self.threads)
        self._module = torch.export.load(self.path).module()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self._module(torch.from_numpy(batch)).numpy()


RUNTIME = TorchRuntime
