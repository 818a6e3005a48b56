"""Runtime micro-benchmark: every stored model and twin, in this process, one thread, no HTTP."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from common import datasets, store
from runtimes import load_runtime

BATCH_SIZES = (1, 8, 64)


@dataclass
class RuntimeResult:
    tag: str
    source: str
    runtime: str
    precision: str
    batch: int
    median_ms: float
    p95_ms: float
    calls: int


def _time_calls(predict, rows: np.ndarray, budget_s: float, min_calls: int) -> list[float]:
    predict(rows)  # warm-up: first calls allocate and pick kernels
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_calls or time.perf_counter() < deadline:
        started = time.perf_counter()
        predict(rows)
        times.append((time.perf_counter() - started) * 1000)
    return times


def run(budget_s: float = 0.3, min_calls: int = 20) -> list[RuntimeResult]:
    results = []
    models = store.list_models(task="classification")
    for model in tqdm(models, desc="runtimes", unit="model"):
        tag = str(model.tag)
        runtime = load_runtime(store.get(tag), threads=1)
        data = datasets.load(model.info.labels["family"])
        pool = np.concatenate([data.x_test] * (1 + 64 // len(data.x_test)))
        for batch in BATCH_SIZES:
            times = _time_calls(runtime.predict, pool[:batch], budget_s, min_calls)
            results.append(RuntimeResult(
                tag=tag, source=model.info.labels.get("twin_of", tag), runtime=runtime.runtime,
                precision=model.info.labels.get("precision", "fp32"), batch=batch,
                median_ms=float(np.median(times)), p95_ms=float(np.percentile(times, 95)), calls=len(times)))
    return results


def speedups(results: list[RuntimeResult]) -> dict[tuple[str, int], float]:
    """Median time of the native source over the twin's, per (twin tag, batch)."""
    by_key = {(r.tag, r.batch): r for r in results}
    return {(r.tag, r.batch): by_key[(r.source, r.batch)].median_ms / r.median_ms
            for r in results if r.source != r.tag and (r.source, r.batch) in by_key}
