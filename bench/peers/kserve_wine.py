"""KServe's Python model server (FastAPI and uvicorn, as this project): 2 workers, no batching,
access and latency logs off (as this project's)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# KServe reads its command line when imported (in its worker processes too): quiet logs.
sys.argv = [sys.argv[0], "--log_config_file", str(Path(__file__).with_name("kserve_logging.json"))]

import kserve  # noqa: E402
import numpy as np  # noqa: E402

from bench.peers import model_file  # noqa: E402

WORKERS = 2


class Wine(kserve.Model):
    def __init__(self) -> None:
        super().__init__("wine")
        self.model = model_file.load()
        self.ready = True

    def predict(self, payload: dict, headers: dict | None = None) -> dict:
        rows = np.asarray(payload["instances"], np.float32)
        return {"predictions": self.model.predict_proba(rows).tolist()}


if __name__ == "__main__":
    kserve.ModelServer(http_port=int(os.environ["PEER_PORT"]), workers=WORKERS, enable_grpc=False,
                       enable_latency_logging=False).start([Wine()])
