"""PyTriton: NVIDIA's Triton Inference Server (C++ front, its dynamic batcher) calling Python functions:
2 model instances, batches of up to 64 rows within 10 ms, OIP over HTTP."""

from __future__ import annotations

import os
import sys

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from bench.peers import model_file

INSTANCES, MAX_BATCH, MAX_WAIT_US = 2, 64, 10_000
FEATURES, CLASSES = 13, 3


def main(grpc_port: int, metrics_port: int) -> None:
    """Triton's HTTP port is ``PEER_PORT``; it opens gRPC and metrics ports too, on free ports given."""
    model = model_file.load()

    @batch
    def infer(input: np.ndarray) -> dict[str, np.ndarray]:  # noqa: A002 (the tensor's name in the request)
        return {"probabilities": model.predict_proba(input).astype(np.float32)}

    config = TritonConfig(http_address="127.0.0.1", http_port=int(os.environ["PEER_PORT"]),
                          grpc_port=grpc_port, metrics_port=metrics_port,
                          log_verbose=0)
    with Triton(config=config) as triton:
        triton.bind(model_name="wine", infer_func=[infer] * INSTANCES,
                    inputs=[Tensor(name="input", dtype=np.float32, shape=(FEATURES,))],
                    outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(CLASSES,))],
                    config=ModelConfig(max_batch_size=MAX_BATCH,
                                       batcher=DynamicBatcher(max_queue_delay_microseconds=MAX_WAIT_US)))
        triton.serve()


if __name__ == "__main__":
    main(*map(int, sys.argv[1:3]))
