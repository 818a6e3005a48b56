"""Ray Serve in its high-throughput mode: HAProxy (Debian's) in front of the 2 replicas' own HTTP ports
(direct ingress), batches of up to 64 rows within 10 ms; a local Ray cluster of 2 CPUs started by this
process (its raylet, GCS and HAProxy are children). Through Ray's Python proxy instead (the mode's
default without ``RAY_SERVE_ENABLE_HA_PROXY``) it did 367 req/s at 32 connections, the proxy at 90% of
a core; with HAProxy, 2,098 in the same minute."""

from __future__ import annotations

import os
import signal

# Read when Ray Serve is imported, here and in every Ray process (they inherit this environment).
os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from starlette.requests import Request  # noqa: E402

from bench.peers import model_file  # noqa: E402

REPLICAS, MAX_BATCH, MAX_WAIT_S, CPUS = 2, 64, 0.010, 2
READY = {"ready": True}


# max_ongoing_requests (default 5) at the batch size: at 5 a replica could never fill a batch, and the
# proxy backed off while both were full (100 req/s, p50 300 ms at 32 connections).
@serve.deployment(num_replicas=REPLICAS, max_ongoing_requests=MAX_BATCH,
                  ray_actor_options={"num_cpus": CPUS / REPLICAS})
class Wine:
    def __init__(self) -> None:
        self.model = model_file.load()

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=MAX_WAIT_S)
    async def predict(self, rows: list[list[float]]) -> list[list[float]]:
        return self.model.predict_proba(np.asarray(rows, np.float32)).tolist()

    async def __call__(self, request: Request) -> dict:
        """POST: one row's probabilities; GET: the readiness the benchmark waits for (served only
        once the replicas are up, unlike the proxy's own ``/-/healthz``)."""
        if request.method == "GET":
            return READY
        return {"probabilities": await self.predict((await request.json())["inputs"])}


if __name__ == "__main__":
    ray.init(num_cpus=CPUS, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": int(os.environ["PEER_PORT"])})
    serve.run(Wine.bind(), name="wine", route_prefix="/")
    stops = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # after Ray's processes start: they would inherit it
    signal.sigwait(stops)
    serve.shutdown()
    ray.shutdown()
