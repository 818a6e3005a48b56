"""The prediction log writer: rows leave the request path at once and reach the store in batches.

``submit`` appends to a bounded in-memory queue and returns; one background thread per worker writes
what is queued every ``flush_s`` (sooner once a batch's worth is waiting), one executemany per table
and flush, and prunes old rows by the retention settings now and then. A slow or unreachable store
never delays an answer: rows beyond the queue are dropped, a failed write drops its batch, both counted
in ``bundle_log_dropped_total``; failures are logged at most once a minute, and writing resumes by
itself when the store returns (the store reconnects, and migrates if it never could). While writes
fail, the thread waits longer between attempts (doubling up to ``RETRY_MAX_S``), so a store that is
down is not asked every ``flush_s`` by every worker; rows keep queueing meanwhile, up to the queue.

Given ``counts``, a flush also copies this worker's running totals of rows answered and failed per
variant to the store (``experiments/trafficstore.py``) when they moved since the last copy, at most every
``TOTALS_EVERY_S``: the counts the report and the decision sum over replicas.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Protocol
from collections.abc import Callable, Iterator, Mapping

from common.logs import get_logger
from common.metrics import LOG_DROPPED, VariantTotals
from experiments.monitorstore import MonitorStore
from experiments.store import ExperimentStore
from experiments.trafficstore import TrafficStore

log = get_logger("predictionlog")

PRUNE_EVERY_S = 3600.0  # retention is in days: pruning hourly keeps the tables near their bound, cheaply
ERROR_LOG_EVERY_S = 60.0  # while the store keeps failing, one log line per minute, not one per flush
CLOSE_WAIT_S = 10.0  # how long close() waits for the last flush
BATCH_SHARE = 4  # a flush starts early once a quarter of the queue is waiting
RETRY_MAX_S = 5.0  # the longest wait between writes while the store keeps failing
# Reading the totals and upserting them at every flush was a quarter of the writer's CPU (9 of 32 us a
# row in `python -m bench.logwriter`): a report's counts a second old are as good, at a tenth of that.
TOTALS_EVERY_S = 1.0
WRITER_NICE = 5
"""How far the writer thread's nice value is above the event loop's. The writer shares the worker's
core and wakes every ``flush_s`` with ~4 ms of rows to write, which the requests in flight waited for.
At 5 the scheduler gives it shorter slices between the event loop's, and still about a quarter of the
core when both want it (it needs under a tenth). Measured, interleaved: p99 / p50 1.90x against 2.11x
(10 rounds) and 1.92x against 2.04x (8), the same throughput, no row dropped (docs/performance.md)."""


class Rows(Protocol):
    """Rows to log, counted when queued and built when iterated: a list, or a record's rows built only in
    the writer thread (``experiments.records.Deferred``), so the request path pays one object."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Mapping[str, Any]]: ...


class PredictionLog:
    def __init__(self, store: ExperimentStore, queue_rows: int, flush_s: float,
                 retention_days: float | None = None, retention_rows: int | None = None,
                 counts: Callable[[], VariantTotals] | None = None, worker: str = ""):
        """``counts``: this worker's running totals (read in the writer thread), kept in the store as
        ``worker``'s."""
        self.store = store
        self._capacity = queue_rows
        self._flush_s = flush_s
        self._early = max(queue_rows // BATCH_SHARE, 1)
        self._retention = (retention_days, retention_rows)
        self._lock = threading.Lock()
        self._live: list[Rows] = []
        self._shadow: list[Rows] = []
        self._samples: list[Rows] = []
        self._pending = 0
        self._monitor = MonitorStore(store)
        self._traffic = TrafficStore(store)
        self._counts, self._worker = counts, worker
        self._published: VariantTotals = {}
        self._totals_due = 0.0  # monotonic time of the next copy of the totals
        self._wake = threading.Event()
        self._closing = False
        self._written = 0
        self._dropped = 0
        self._last_error: str | None = None
        self._last_flush_at: float | None = None
        self._error_logged_at = -ERROR_LOG_EVERY_S
        self._failures = 0
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    def submit(self, rows: Rows) -> None:
        """Queue live prediction rows (``ExperimentStore.log_predictions``); never blocks or raises."""
        self._enqueue(self._live, rows)

    def submit_shadow(self, rows: Rows) -> None:
        """Queue shadow answer rows (``ExperimentStore.insert_shadow``); never blocks or raises."""
        self._enqueue(self._shadow, rows)

    def submit_samples(self, rows: Rows) -> None:
        """Queue sampled inputs (``MonitorStore.insert_samples``); never blocks or raises."""
        self._enqueue(self._samples, rows)

    def status(self) -> dict[str, Any]:
        """For ``/readyz`` detail: whether the last write worked, and the counts of this worker."""
        with self._lock:
            pending = self._pending
            return {"ok": self._last_error is None, "written": self._written, "dropped": self._dropped,
                    "pending": pending, "last_error": self._last_error, "last_flush_at": self._last_flush_at}

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
        self._closing = True
        self._wake.set()
        self._thread.join(CLOSE_WAIT_S)

    def _enqueue(self, queue: list[Rows], rows: Rows) -> None:
        count = len(rows)
        with self._lock:
            room = max(self._capacity - self._pending, 0)
            if count <= room:
                queue.append(rows)
            elif room:
                queue.append(list(rows)[:room])  # a full queue: only then are rows built here
            dropped = max(count - room, 0)
            self._pending += count - dropped
            self._dropped += dropped
            waiting = self._pending
        if dropped:
            LOG_DROPPED.labels(reason="queue_full").inc(dropped)
        if waiting >= self._early and not self._failures:  # a failing store is retried at its own pace
            self._wake.set()

    def _run(self) -> None:
        _lower_priority(WRITER_NICE)
        next_prune = time.monotonic()
        while True:
            self._wake.wait(self._wait_s())
            self._wake.clear()
            closing = self._closing
            self._flush()
            if closing:
                return
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + PRUNE_EVERY_S
                self._prune()

    def _wait_s(self) -> float:
        """``flush_s``; while writes fail, doubling with each failure up to ``RETRY_MAX_S``."""
        if not self._failures:
            return self._flush_s
        return max(min(self._flush_s * 2 ** min(self._failures, 16), RETRY_MAX_S), self._flush_s)

    def _flush(self) -> None:
        """What is queued, and this worker's running totals when due and moved since the last copy, in
        one transaction: one commit a flush, and a failed one drops its rows (counted) and copies the
        totals again next time, so nothing but the dropped rows is lost. Closing copies them at once."""
        with self._lock:
            queued = ((self._live, self.store.log_predictions), (self._shadow, self.store.insert_shadow),
                      (self._samples, self._monitor.insert_samples))
            self._live, self._shadow, self._samples, self._pending = [], [], [], 0
        writes = [(rows, write) for chunks, write in queued if (rows := [row for chunk in chunks for row in chunk])]
        now = time.monotonic()
        due = self._counts is not None and (self._closing or now >= self._totals_due)
        totals = self._counts() if due and self._counts is not None else self._published
        moved = totals != self._published
        if not writes and not moved:
            if due:  # read and unchanged (an idle worker): the next read in a second, not next flush
                self._totals_due = now + TOTALS_EVERY_S
            return
        count = sum(len(rows) for rows, _ in writes)
        try:
            with self.store.batch():
                for rows, write in writes:
                    write(rows)
                if moved:
                    self._traffic.publish(self._worker, totals)
        except Exception as err:  # the log must outlive any store failure; counted and logged
            self._failed(count, err)
        else:
            if due:
                self._totals_due = now + TOTALS_EVERY_S
            self._published = totals
            self._succeeded(count)

    def _succeeded(self, rows: int) -> None:
        if self._failures:
            log.warning("prediction log writes again", extra={"store": self.store.url, "failed_flushes": self._failures})
        with self._lock:
            self._written += rows
            self._last_error = None
            self._last_flush_at = time.time()
            self._failures = 0

    def _failed(self, rows: int, err: Exception) -> None:
        LOG_DROPPED.labels(reason="store_error").inc(rows)
        with self._lock:
            self._dropped += rows
            self._last_error = f"{type(err).__name__}: {err}"
            self._failures += 1
        now = time.monotonic()
        if now - self._error_logged_at >= ERROR_LOG_EVERY_S:
            self._error_logged_at = now
            log.error("prediction log write failed, rows dropped",
                      extra={"store": self.store.url, "error": self._last_error, "failed_flushes": self._failures})

    def _prune(self) -> None:
        days, rows = self._retention
        if days is None and rows is None:
            return
        try:
            removed = self.store.prune(days, rows)
        except Exception as err:  # retention is retried at the next hour; the log keeps writing
            log.error("prediction log pruning failed", extra={"store": self.store.url, "error": str(err)})
        else:
            log.info("prediction log pruned", extra={"rows": removed})


def _lower_priority(by: int) -> None:
    """This thread's nice value raised ``by`` (Linux schedules threads one by one); left as it is where
    it cannot be."""
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + by)
    except (AttributeError, OSError) as err:  # not Linux, or a sandbox that refuses it: writing goes on
        log.warning("prediction log writer keeps its priority", extra={"error": str(err)})
