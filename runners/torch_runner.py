"""PyTorch: a ``torch.export`` program, loaded without unpickling arbitrary objects."""

from __future__ import annotations

import numpy as np
import torch

from runners.base import Runner


class TorchRunner(Runner):
    runtime = "torch"

    def load(self) -> None:
        torch.set_num_threads(self.threads)
        self._module = torch.export.load(self.path).module()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self._module(torch.from_numpy(batch)).numpy()


RUNNER = TorchRunner
