"""PyTorch: a ``torch.export`` program, loaded without unpickling arbitrary objects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from runtimes.base import Runtime


class TorchRuntime(Runtime):
    runtime = "torch"

    @classmethod
    def preload(cls, path: Path) -> None:
        """The first ``torch.export.load`` imports the export machinery (FX, SymPy, networkx): ~100 MiB a
        process. Loading a program and dropping it starts no thread."""
        torch.export.load(path)

    def load(self) -> None:
        torch.set_num_threads(self.threads)
        self._module = torch.export.load(self.path).module()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self._module(torch.from_numpy(batch)).numpy()


RUNTIME = TorchRuntime
