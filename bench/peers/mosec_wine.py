"""mosec: a Rust HTTP front and Python workers; 2 workers, batches of up to 64 rows within 10 ms."""

from __future__ import annotations

import os
import sys

import numpy as np
from mosec import Server, Worker

from bench.peers import model_file

WORKERS, MAX_BATCH, MAX_WAIT_MS = 2, 64, 10


class Wine(Worker):
    def __init__(self) -> None:
        super().__init__()
        self.model = model_file.load()

    def forward(self, data: list[dict]) -> list[list[float]]:
        rows = np.asarray([item["inputs"] for item in data], np.float32)
        return self.model.predict_proba(rows).tolist()


if __name__ == "__main__":
    sys.argv = [sys.argv[0], "--address", "127.0.0.1", "--port", os.environ["PEER_PORT"], "--log-level", "error"]
    server = Server()
    server.append_worker(Wine, num=WORKERS, max_batch_size=MAX_BATCH, max_wait_time=MAX_WAIT_MS)
    server.run()
