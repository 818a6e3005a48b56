"""Periodic work done by exactly one worker of all: a thread in every worker, a lease in the store.

Every worker (of every replica sharing the experiment store) runs the same round each period; only
the holder of the lease (``MonitorStore.acquire``, renewed by each of its rounds for ``ttl_periods``
periods) does the work, so a holder that dies is replaced within that many periods. A store that is
down skips a round, and no failure stops the thread: the next round tries again.
"""

from __future__ import annotations

import threading
from typing import Any, TypeVar
from collections.abc import Callable

from common.logs import get_logger
from experiments.monitorstore import MonitorStore
from experiments.store import StoreUnavailable

log = get_logger("experiments")
T = TypeVar("T")


class LeasedRound:
    def __init__(self, tables: MonitorStore, lease: str, holder: str, period_s: float, ttl_periods: float):
        self.tables = tables
        self.lease = lease
        self.holder = holder
        self.period_s = period_s
        self.ttl_s = period_s * ttl_periods
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run(self, work: Callable[[], T], now: float | None = None) -> T | None:
        """``work``'s result when this holder has (or takes) the lease, else None (another holds it,
        or the store is down)."""
        try:
            if not self.tables.acquire(self.lease, self.holder, self.ttl_s, now):
                return None
            return work()
        except StoreUnavailable as err:  # the next round tries again; answers are never affected
            log.warning(f"scheduled {self.lease} round skipped", extra={"reason": str(err)})
            return None

    def every_period(self, work: Callable[[], Any]) -> None:
        """Run ``work`` under the lease each period in a daemon thread (once per object)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, args=(work,), name=self.lease, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def _loop(self, work: Callable[[], Any]) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.run(work)
            except Exception as err:  # this thread must outlive any failure, or the work stops for good
                log.error(f"scheduled {self.lease} round failed", extra={"reason": repr(err)})
