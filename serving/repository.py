"""The live model repository of one worker: models loaded and unloaded while it serves.

An API call writes a wish to the experiment store (``experiments/repositorystore.py``); every worker
of every replica polls the wishes each ``repository.poll_s`` and reconciles towards them in a
background thread, never on the event loop. A model is loaded, then must reproduce the test-split
probabilities stored with it under the twins' gates (``common/parity.py``: the FP32 rule for exact
models, the INT8 rule for int8 twins) before it is swapped into the catalogue and the batch queues; a
request in flight finishes on the runtime it started with. An unload takes the model out of routing
first, then drops it and hands its memory back to the system (``gc.collect``, ``malloc_trim``). Each
worker reports its state per model (loading, ready, failed, unloading, unloaded, with its RSS) and a
heartbeat, so an API call can wait until every live worker is done, and ``GET /admin/models`` shows
the truth per worker.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import threading
import time
from typing import Any
from collections.abc import Callable

import bentoml
import psutil

from common import datasets, store
from common import parity as gates
from common.config import Repository
from common.errors import ConflictError, RequestError, UnavailableError
from common.ids import replica_id, worker_id
from common.logs import get_logger
from experiments.repositorystore import RepositoryStore
from experiments.router import Router
from experiments.store import StoreUnavailable
from runtimes import Runtime
from serving.batching import Batcher, Unbatched
from serving.cache import PredictionCache
from serving.catalog import Catalog

log = get_logger("repository")
ALIVE_POLLS = 10
"""A worker whose heartbeat is older than this many polls (and ``ALIVE_MIN_S``) is taken for gone."""
ALIVE_MIN_S = 5.0
WAIT_SLACK_S = 2.0
"""A load or unload call waits for the workers until the service's timeout less this."""
LOADED, UNLOADED = "loaded", "unloaded"
INT8 = "int8"


class ParityError(Exception):
    """A loaded model that does not reproduce the probabilities stored with it."""


class ModelRepository:
    def __init__(self, catalog: Catalog, queue: Batcher | Unbatched, wishes: RepositoryStore,
                 settings: Repository, timeout_s: float, cache: PredictionCache | None = None):
        """Applies the store's wishes once before returning (a model wished loaded is served from the
        first request, beside config.yaml's); :meth:`start` then follows them. ``cache``: the prediction
        cache, whose rows of a model are dropped when it is loaded or unloaded."""
        self.catalog = catalog
        self.store = wishes
        self.settings = settings
        self.worker = worker_id()
        self.alive_s = max(ALIVE_POLLS * settings.poll_s, ALIVE_MIN_S)
        self._queue = queue
        self._cache = cache
        self._wait_s = max(timeout_s - WAIT_SLACK_S, 1.0)
        self._started_at = time.time()
        self._seen: dict[str, int] = {}
        self._last_failure: dict[str, str] = {}
        self._lock = threading.Lock()  # one reconciliation at a time: the poller's, or a test's
        self._on_change: Callable[[], None] = lambda: None
        self._router: Callable[[], Router] | None = None
        self._beat()
        for tag in catalog.runtimes:
            self._report(tag, "ready", "loaded at start")
        for tag, failure in catalog.failures.items():
            self._report(tag, "failed", failure["error"])
        self.poll()

    def start(self, on_change: Callable[[], None], router: Callable[[], Router]) -> None:
        """Follow the wishes in the background. ``on_change`` runs after every model that became
        ready or went away (the live experiments rebuild their router); ``router`` is the routing in
        force, asked before an unload."""
        self._on_change, self._router = on_change, router
        threading.Thread(target=self._every_poll, args=(self.poll,), name="repository", daemon=True).start()
        threading.Thread(target=self._every_poll, args=(self._beat,), name="heartbeat", daemon=True).start()

    def stop(self) -> None:
        """This worker is going away: its heartbeat and states leave the store."""
        try:
            self.store.forget(self.worker)
        except StoreUnavailable as err:
            log.warning("worker not removed from the repository", extra={"reason": str(err)})

    # -- the background reconciliation ----------------------------------------------------------------

    def _every_poll(self, step: Callable[[], None]) -> None:
        while True:
            time.sleep(self.settings.poll_s)
            step()

    def _beat(self) -> None:
        try:
            self.store.heartbeat(self.worker, replica_id(), os.getpid(), self._started_at)
        except StoreUnavailable as err:
            log.warning("repository heartbeat failed", extra={"reason": str(err)})

    def poll(self) -> None:
        """Apply every wish whose version this worker has not applied yet (all of them at start). The
        store down: nothing changes here, the next poll retries."""
        with self._lock:
            try:
                wishes = self.store.wishes()
            except StoreUnavailable as err:
                log.warning("repository wishes unreadable", extra={"reason": str(err)})
                return
            for tag, (desired, version) in wishes.items():
                if self._seen.get(tag) == version:
                    continue
                try:
                    if desired == LOADED:
                        self._load(tag)
                    else:
                        self._unload(tag)
                except Exception:  # a broken store or model must not stop this thread: the next wish still runs
                    log.exception("repository wish not applied", extra={"model_tag": tag, "desired": desired})
                self._seen[tag] = version

    def _load(self, tag: str) -> None:
        """Load, check, swap in; a model already ready stays as it is (unload it first to reload)."""
        if tag in self.catalog.runtimes:
            self._report(tag, "ready")
            return
        self.catalog.pending[tag] = "loading"
        self._report(tag, "loading")
        started = time.perf_counter()
        try:
            model = self.catalog.model(tag)
            runtime = self.catalog.load(model)
            problems = reproduces(model, runtime)
            if problems:
                raise ParityError(f"does not reproduce its stored test-split probabilities: {'; '.join(problems)}")
        except Exception as err:  # whatever the model's fault, it is refused and reported, never raised
            self.catalog.fail(tag, err)
            self._last_failure[tag] = str(err)
            self._report(tag, "failed", str(err))
            self._on_change()
            return
        if self._cache is not None:  # rows kept by requests that finished on an earlier load of this tag
            self._cache.drop(tag)
        self._queue.add(tag, runtime)
        self.catalog.add(model, runtime)
        self._last_failure.pop(tag, None)
        seconds = time.perf_counter() - started
        self._report(tag, "ready", f"loaded and checked in {seconds:.2f} s")
        log.info("model loaded", extra={"model_tag": tag, "seconds": round(seconds, 3)})
        self._on_change()

    def _unload(self, tag: str) -> None:
        """Out of routing first (the router rebuilt without it), then out of the queues and the
        catalogue; its memory goes back to the system once the requests holding it finish."""
        if tag not in self.catalog.runtimes:
            self.catalog.remove(tag)
            self._report(tag, "unloaded")
            return
        rss_before = _rss()
        self.catalog.pending[tag] = "unloading"
        self._report(tag, "unloading")
        self._on_change()
        self._queue.remove(tag)
        runtime: Runtime | None = self.catalog.remove(tag)
        if self._cache is not None:
            self._cache.drop(tag)
        del runtime
        gc.collect()
        _malloc_trim()
        rss = _rss()
        self._report(tag, "unloaded", f"RSS {rss_before / 2**20:.1f} -> {rss / 2**20:.1f} MiB", rss)
        log.info("model unloaded", extra={"model_tag": tag, "rss_before": rss_before, "rss_after": rss})
        self._on_change()

    def _report(self, tag: str, state: str, reason: str | None = None, rss: int | None = None) -> None:
        """This worker's state of ``tag`` to the store (down: logged; the worker's own state holds)."""
        try:
            self.store.report(self.worker, tag, state, reason, _rss() if rss is None else rss)
        except StoreUnavailable as err:
            log.warning("repository state not reported", extra={"model_tag": tag, "state": state,
                                                                "reason": str(err)})

    # -- the API (protocols/repository.py) -------------------------------------------------------------

    def load(self, tag: str, reason: str) -> dict[str, Any]:
        """Wish ``tag`` loaded and wait until every live worker has it ready, or the RequestError naming
        the first failure (a model that fails its check anywhere goes back to unloaded everywhere).
        Blocking: call it in a thread."""
        self.catalog.model(tag, "name")
        before = self.store.wishes().get(tag)
        asked = time.time()
        self.store.request(tag, LOADED, reason)
        states = self._wait(tag, asked, {"ready", "failed"})
        failed = {worker: s["reason"] for worker, s in states.items() if s["state"] == "failed"}
        if not failed:
            return {"name": tag, "state": "READY", "workers": states}
        if before is None or before[0] != LOADED:
            asked = time.time()
            self.store.request(tag, UNLOADED, f"load refused: {next(iter(failed.values()))}")
            self._wait(tag, asked, {UNLOADED})
        worker, why = next(iter(failed.items()))
        raise RequestError("name", f"model {tag} not loaded: {why} (worker {worker})",
                           "a model that reproduces the probabilities stored with it")

    def unload(self, tag: str, force: bool, reason: str) -> dict[str, Any]:
        """Wish ``tag`` unloaded and wait until no live worker holds it; refused (409) while a variant
        routes to it with weight above 0, unless ``force`` (that variant then gets no traffic).
        Blocking: call it in a thread."""
        self.catalog.model(tag, "name")
        routed = self.routed(tag)
        if routed and not force:
            raise ConflictError("name", f"model {tag} still takes traffic as {', '.join(routed)}",
                                "weight 0 for those variants first, or force (parameters.force or ?force=true)")
        asked = time.time()
        self.store.request(tag, UNLOADED, reason)
        return {"name": tag, "state": "UNAVAILABLE", "workers": self._wait(tag, asked, {UNLOADED})}

    def routed(self, tag: str) -> list[str]:
        """The variants that route to ``tag`` with a weight above 0, as ``model/variant (weight w)``."""
        router = self._router() if self._router is not None else None
        if router is None:
            return []
        return [f"{model}/{v.name} (weight {v.weight:g})" for model in router.models
                for v in router.experiment(model).variants if v.model == tag and v.weight > 0]

    def _wait(self, tag: str, asked: float, done: set[str]) -> dict[str, dict[str, Any]]:
        """Every live worker's state of ``tag`` once each has reported one of ``done`` since ``asked``,
        or 503 naming the workers still busy after the wait."""
        deadline = time.monotonic() + self._wait_s
        while True:
            states = {worker: models.get(tag) for worker, models in self.store.states(self.alive_s).items()}
            busy = sorted(w for w, s in states.items() if s is None or s["updated_at"] < asked or s["state"] not in done)
            if not busy:
                return {w: {k: s[k] for k in ("state", "reason", "rss_bytes")} for w, s in states.items() if s}
            if time.monotonic() > deadline:
                raise UnavailableError("name", f"model {tag}: workers {busy} have not finished after "
                                       f"{self._wait_s:.0f} s; POST /v2/repository/index shows their progress")
            time.sleep(min(self.settings.poll_s, 0.1))

    def index(self, ready_only: bool) -> list[dict[str, Any]]:
        """Every stored model and its state in this worker, as Triton's repository index lists them."""
        tags = sorted({str(m.tag) for m in bentoml.models.list()} | set(self.catalog.models))
        out = []
        for tag in tags:
            state, reason = self.state(tag)
            if state == "READY" or not ready_only:
                out.append({"name": tag, "version": tag.partition(":")[2], "state": state, "reason": reason})
        return out

    def state(self, tag: str) -> tuple[str, str]:
        """``tag``'s state in this worker (READY, LOADING, UNLOADING, UNAVAILABLE) and why."""
        pending = self.catalog.pending.get(tag)
        if pending is not None:
            return pending.upper(), pending
        if tag in self.catalog.runtimes:
            return "READY", ""
        if tag in self.catalog.failures:
            return "UNAVAILABLE", self.catalog.failures[tag]["error"]
        last = self._last_failure.get(tag)
        return "UNAVAILABLE", f"unloaded; the last load was refused: {last}" if last else "unloaded"

    def workers(self) -> dict[str, Any]:
        """Every live worker's models and states (``GET /admin/models``)."""
        return {"worker": self.worker, "workers": self.store.states(self.alive_s),
                "wishes": {tag: {"desired": d, "version": v} for tag, (d, v) in self.store.wishes().items()}}


def reproduces(model: bentoml.Model, runtime: Runtime) -> list[str]:
    """Every gate ``runtime`` fails on its family's test split against the probabilities stored with
    ``model``: the INT8 rule for an int8 twin, the FP32 rule (the same function) for every other model."""
    labels = model.info.labels
    data = datasets.load(labels.get("family", ""))
    expected = store.stored_test_probs(model)
    answered = runtime.infer(data.x_test)
    if answered.shape != expected.shape:
        return [f"answered {answered.shape} probabilities on the {data.family} test split, {expected.shape} were stored"]
    precision = INT8 if INT8 in (labels.get("precision"), model.info.metadata.get("precision")) else "fp32"
    return gates.failures(gates.compare(answered, expected, data.y_test), precision, "stored test probabilities")


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


def _malloc_trim() -> None:
    """Freed heap pages back to the system (glibc keeps them otherwise, and RSS would not drop)."""
    libc = ctypes.util.find_library("c")
    if libc:
        trim = getattr(ctypes.CDLL(libc), "malloc_trim", None)
        if trim is not None:
            trim(0)
