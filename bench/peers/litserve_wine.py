"""LitServe (FastAPI and uvicorn in front, inference worker processes behind): 2 workers, batches of up
to 64 rows within 10 ms."""

from __future__ import annotations

import os

import litserve as ls
import numpy as np

from bench.peers import model_file

WORKERS, MAX_BATCH, MAX_WAIT_S = 2, 64, 0.010


class Wine(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model = model_file.load()

    def decode_request(self, request: dict) -> list[float]:
        return request["inputs"]

    def batch(self, inputs: list[list[float]]) -> np.ndarray:
        return np.asarray(inputs, np.float32)

    def predict(self, rows: np.ndarray) -> np.ndarray:
        return self.model.predict_proba(rows)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, output: np.ndarray) -> dict:
        return {"probabilities": output.tolist()}


if __name__ == "__main__":
    server = ls.LitServer(Wine(max_batch_size=MAX_BATCH, batch_timeout=MAX_WAIT_S), accelerator="cpu",
                          workers_per_device=WORKERS)
    server.run(host="127.0.0.1", port=int(os.environ["PEER_PORT"]), log_level="error", generate_client_file=False)
