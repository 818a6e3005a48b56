"""The ceiling: a bare BentoML service with a trivial batchable API taking the same body as /predict.

Started the same way and with the same settings as the real service (workers, access log, batching
limits from config.yaml), it shows what BentoML itself allows on this machine; every other figure is
also given as a ratio to it, measured in the same run.
"""

from __future__ import annotations

import bentoml

from common import config

CONFIG = config.load()


@bentoml.service(
    name="bare",
    workers=CONFIG.service.workers,
    traffic={"timeout": CONFIG.service.timeout_s, "max_concurrency": CONFIG.service.max_concurrency},
    logging={"access": {"enabled": CONFIG.service.access_log}},
)
class Bare:
    @bentoml.api(batchable=True, max_batch_size=CONFIG.batching.max_batch_size,
                 max_latency_ms=CONFIG.batching.max_latency_ms)
    def predict(self, instances: list[dict]) -> list[dict]:
        return [{"label": "0"} for _ in instances]
