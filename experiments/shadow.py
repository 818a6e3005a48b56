"""Shadow traffic: a copy of live rows for an experiment's shadow variant, off the latency path.

The live answer is computed first; the copy then goes to a bounded queue served by one background
thread. A full queue drops the copy (counted), and a failing shadow is counted, never raised, so a
slow or broken shadow cannot touch a live answer.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping, Sequence

import numpy as np

from common.config import Variant
from common.logs import get_logger
from common.metrics import SHADOW
from experiments.records import Recorder, ShadowRecord
from runtimes import Runtime

log = get_logger("shadow")


class Shadow:
    def __init__(self, runtimes: Mapping[str, Runtime], max_pending: int, log: Recorder | None = None):
        self._runtimes = runtimes
        self._log = log
        self._pending: queue.Queue[tuple[str, Variant, np.ndarray, np.ndarray, Sequence[str], Sequence[str]]] = (
            queue.Queue(max_pending))
        threading.Thread(target=self._serve, name="shadow", daemon=True).start()

    def submit(self, model: str, variant: Variant, rows: np.ndarray, live_labels: np.ndarray,
               prediction_ids: Sequence[str], classes: Sequence[str]) -> None:
        """Queue a copy of answered rows; the shadow's answers are logged under the live ``prediction_ids``
        so that feedback grades both (a paired comparison)."""
        try:
            self._pending.put_nowait((model, variant, rows, live_labels, prediction_ids, classes))
        except queue.Full:
            SHADOW.labels(model=model, variant=variant.name, outcome="dropped").inc(len(rows))

    def _serve(self) -> None:
        while True:
            model, variant, rows, live_labels, prediction_ids, classes = self._pending.get()
            try:
                probabilities = self._runtimes[variant.model].infer(rows)
            except Exception:  # any failure of the shadow model is counted, never propagated
                log.exception("shadow prediction failed", extra={"model": model, "variant": variant.name})
                SHADOW.labels(model=model, variant=variant.name, outcome="error").inc(len(rows))
                continue
            if self._log is not None:
                self._log.shadow(ShadowRecord(variant.name, variant.model, prediction_ids, classes, probabilities))
            labels = probabilities.argmax(axis=1)
            agree = int((labels == live_labels).sum())
            SHADOW.labels(model=model, variant=variant.name, outcome="agree").inc(agree)
            SHADOW.labels(model=model, variant=variant.name, outcome="disagree").inc(len(rows) - agree)
