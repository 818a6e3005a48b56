"""Median latency of a predict call, with a time budget so that a full conversion stays CI-sized."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

BATCHES = (1, 64)
WARMUP_CALLS = 3
MIN_CALLS = 5
MAX_CALLS = 200
BUDGET_S = 0.25
"""Per measurement: enough calls for a stable median of a microsecond call, few for a slow one."""


def profile(predict: Callable[[np.ndarray], object], rows: np.ndarray) -> dict[str, float]:
    """Median milliseconds per call at each of :data:`BATCHES` (test rows repeated to fill a batch)."""
    return {f"batch_{size}": median_ms(predict, batch(rows, size)) for size in BATCHES}


def batch(rows: np.ndarray, size: int) -> np.ndarray:
    return np.ascontiguousarray(rows[np.arange(size) % len(rows)])


def median_ms(predict: Callable[[np.ndarray], object], rows: np.ndarray) -> float:
    started = time.perf_counter()
    for _ in range(WARMUP_CALLS):
        predict(rows)
    per_call = (time.perf_counter() - started) / WARMUP_CALLS
    calls = int(np.clip(BUDGET_S / max(per_call, 1e-9), MIN_CALLS, MAX_CALLS))
    timings = []
    for _ in range(calls):
        started = time.perf_counter()
        predict(rows)
        timings.append(time.perf_counter() - started)
    return float(np.median(timings) * 1000.0)


def speedups(source: dict[str, float], twin: dict[str, float]) -> dict[str, float]:
    return {key: source[key] / twin[key] for key in source}
