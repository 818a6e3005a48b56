"""MLServer (Open Inference Protocol): 2 parallel inference workers, adaptive batching 64 / 10 ms.

Run as ``mlserver start <folder>``; ``settings(folder, port)`` writes that folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

from bench.peers import model_file

WORKERS, MAX_BATCH, MAX_WAIT_S = 2, 64, 0.01


class Wine(MLModel):
    async def load(self) -> bool:
        self._model = model_file.load()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        rows = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        probabilities = self._model.predict_proba(rows).astype(np.float32)
        return InferenceResponse(model_name=self.name,
                                 outputs=[NumpyCodec.encode_output("probabilities", probabilities)])


def settings(folder: Path, port: int, grpc_port: int, metrics_port: int) -> None:
    (folder / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": port, "grpc_port": grpc_port, "metrics_port": metrics_port,
        "parallel_workers": WORKERS, "debug": False}))
    (folder / "model-settings.json").write_text(json.dumps({
        "name": "wine", "implementation": "bench.peers.mlserver_wine.Wine",
        "max_batch_size": MAX_BATCH, "max_batch_time": MAX_WAIT_S}))
