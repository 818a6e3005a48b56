"""Live experiments: the variants, weights and shadows in force, shared by every worker (and every
replica) through the experiment store (``experiments/statestore.py``).

config.yaml is the declaration read at start; while serving, the store's row of each experiment is the
truth. At start and whenever the file changes on disk its declarations are reconciled with the store
by the rule of ``statestore.py`` (a new one is seeded, an edited one wins, an unchanged one leaves the
live changes in force). A change (an admin's weights, a promote, a rollback, a rollout step, a variant
added or removed) is validated, written compare-and-set on the row's version, recorded in the weight
history by the worker that wrote it, and applied there at once; every worker polls the versions every
``repository.poll_s`` and swaps in a new router. A store that cannot be reached leaves the last state in
force (at start: the file's) and refuses changes with 503 (``StoreUnavailable``); it is asked again
after a wait doubling from ``poll_s`` up to ``RECONNECT_MAX_S`` (no tight loop against a database that
is down, and a reconnection within seconds of its return); the file keeps being followed for API keys
and rate limits (``listeners``).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Mapping, Sequence

from pydantic import ValidationError

from common import config
from common.config import NAME_PATTERN, Config, Experiment
from common.errors import ConflictError, NotFoundError, RequestError
from common.logs import get_logger
from common.metrics import EXPERIMENT_VERSION
from experiments.ledger import Ledger
from experiments.router import Router
from experiments.statestore import Conflict, StateStore
from experiments.store import StoreUnavailable

FILE_POLL_S = 0.2
"""How often config.yaml's modification time is read: API keys and rate limits follow it this fast."""
RECONNECT_MAX_S = 4.0
"""The longest wait between two attempts to reach a store that is down."""
WRITE_ATTEMPTS = 5
"""Compare-and-set attempts of one change before it is refused (409): only other writers make one fail."""
log = get_logger("experiments")

Availability = Callable[[], tuple[set[str], dict[str, str]]]
"""The model tags ready in this worker, and why each other known tag is not (failed, loading)."""
Declare = Callable[[str, Experiment], None]
"""Learn the schema of a new or changed experiment; ``RequestError`` naming the field if it cannot serve."""
OnChange = Callable[[Experiment | None, Experiment], None]
"""Gets the experiment as it was (None: created) and as written, in the worker that wrote it."""


@dataclass(frozen=True)
class InForce:
    experiment: Experiment
    version: int  # 0: the file's, never read from the store (it could not be reached yet)
    source: str


class LiveExperiments:
    def __init__(self, path: Path, ledger: Ledger, availability: Availability, declare: Declare,
                 listeners: Sequence[Callable[[Config], None]] = ()):
        """``ledger`` owns the store and the weight history. ``listeners`` follow the file: each gets
        every configuration read from it, the first included (the API keys and rate limits of
        ``protocols/access.py``)."""
        self.path = path
        self._ledger = ledger
        self._states = StateStore(ledger.store)
        self._availability = availability
        self._declare = declare
        self._listeners = tuple(listeners)
        self._lock = threading.RLock()  # one read-or-write-then-apply at a time in this worker
        self._in_force: dict[str, InForce] = {}
        self._declared: dict[str, frozenset[str]] = {}
        self._versions: dict[str, int] = {}  # the store's, as last read or written here
        # Stamp first, then read: a change written in between is seen by the next poll.
        self._seen = self._stamp()
        self._config = config.load(path)
        self._poll_s = self._config.repository.poll_s
        self._notify(self._config)
        self._reconciled = False
        try:
            self._sync()
        except StoreUnavailable as err:
            log.warning("experiment store unreachable: serving config.yaml's experiments",
                        extra={"reason": str(err)})
            self._apply({name: InForce(e, 0, "config") for name, e in self._config.experiments.items()})
        threading.Thread(target=self._watch, name="experiments-watch", daemon=True).start()

    # -- following the store and the file -------------------------------------------------------------

    def _stamp(self) -> tuple[int, int]:
        stat = self.path.stat()
        return stat.st_mtime_ns, stat.st_ino

    def _watch(self) -> None:
        failures, due = 0, time.monotonic() + self._poll_s
        while True:
            time.sleep(min(FILE_POLL_S, self._poll_s))
            try:
                if not self._follow_file() and time.monotonic() < due:
                    continue
                due = time.monotonic() + self._poll_s
                self._sync()
                if failures:
                    log.warning("experiment store reachable again", extra={"failed_polls": failures})
                failures = 0
            except StoreUnavailable as err:
                if not failures:
                    log.warning("experiment store unreachable: the last experiments stay in force",
                                extra={"reason": str(err)})
                failures += 1
                due = time.monotonic() + min(self._poll_s * 2 ** min(failures, 16), RECONNECT_MAX_S)
            except Exception as err:  # this thread must outlive any bad edit, or the worker stops following
                log.error("configuration change not applied", extra={"reason": str(err)})

    def _follow_file(self) -> bool:
        """Read config.yaml if it changed (True), for the listeners and to reconcile its declarations."""
        stamp = self._stamp()
        if stamp == self._seen:
            return False
        self._seen = stamp
        new = config.load(self.path)
        self._notify(new)  # first: a revoked API key must not wait for a store call holding the lock
        with self._lock:
            self._config = new
            self._reconciled = False
        return True

    def _notify(self, new: Config) -> None:
        for listener in self._listeners:
            listener(new)

    def _sync(self) -> None:
        """Reconcile the file's declarations once per version of the file, then apply the store's
        experiments if any version moved."""
        with self._lock:
            if not self._reconciled:
                self._reconcile()
        if self._states.versions() == self._versions:
            return
        with self._lock:
            states = self._states.states()
            self._versions = {name: s.version for name, s in states.items()}
            self._apply({name: InForce(Experiment.model_validate(s.document), s.version, s.source)
                         for name, s in states.items()})

    def _reconcile(self) -> None:
        """The file's declarations into the store (``StateStore.reconcile``), each recorded in the weight
        history by the worker that applied it. One this worker cannot declare is not applied."""
        declarations = {}
        for name, experiment in self._config.experiments.items():
            try:
                self._learn(name, experiment)
            except RequestError as err:
                log.error("configuration change not applied", extra={"model": name, "reason": str(err)})
                continue
            declarations[name] = experiment
        for change in self._states.reconcile(declarations):
            self._ledger.record_change(change.model, "config", _weights(change.before),
                                       _weights(change.after), change.reason)
        self._reconciled = True

    def _learn(self, name: str, experiment: Experiment) -> None:
        """``declare`` an experiment whose models changed since this worker last declared it."""
        variants = [*experiment.variants, *([experiment.shadow] if experiment.shadow else [])]
        tags = frozenset(v.model for v in variants)
        if self._declared.get(name) != tags:
            self._declare(name, experiment)
            self._declared[name] = tags

    def _apply(self, in_force: Mapping[str, InForce]) -> None:
        """Swap in ``in_force``; an experiment this worker cannot declare keeps its previous state."""
        with self._lock:
            applied = {}
            for name in self._ordered(in_force):
                try:
                    self._learn(name, in_force[name].experiment)
                    applied[name] = in_force[name]
                except RequestError as err:
                    log.error("experiment change not applied", extra={"model": name, "reason": str(err)})
                    if name in self._in_force:
                        applied[name] = self._in_force[name]
            self._in_force = applied
            self.refresh()

    def _ordered(self, names: Mapping[str, Any]) -> list[str]:
        """config.yaml's experiments in its order, then those created live by name."""
        declared = [name for name in self._config.experiments if name in names]
        return declared + sorted(set(names) - set(declared))

    def current(self) -> Router:
        """The router after reading the store now, for admin operations that validate against the
        experiments in force: a variant another worker added a moment ago must be known here, while
        polling lags by up to ``poll_s``. The last router when the store cannot be reached."""
        try:
            self._sync()
        except StoreUnavailable:
            pass
        return self.router

    def refresh(self) -> None:
        """Rebuild the router from the state in force and this worker's models now: a variant whose model
        is not ready here (failed, loading, not loaded) gets no traffic in this worker."""
        with self._lock:
            ready, failed = self._availability()
            experiments = {name: s.experiment for name, s in self._in_force.items()}
            tags = {v.model for e in experiments.values() for v in e.variants}
            self.router = Router(experiments, {t: failed.get(t, "not loaded in this worker")
                                               for t in tags if t not in ready})
            epochs = {m: self.router.epoch(m) for m in self.router.models}
            for name, state in self._in_force.items():
                EXPERIMENT_VERSION.labels(model=name).set(state.version)
        log.info("experiments applied", extra={"epochs": epochs})

    # -- reading --------------------------------------------------------------------------------------

    def describe(self) -> dict[str, dict[str, Any]]:
        """Per experiment in force: ``source`` and ``version`` of its state (version 0: config.yaml's, the
        store not reached yet), and ``config``: whether the file declares it and whether the file's
        declaration is what is in force."""
        with self._lock:
            declared = self._config.experiments
            return {name: {"source": s.source, "version": s.version,
                           "config": {"declared": name in declared,
                                      "matches_store": name in declared and declared[name] == s.experiment}}
                    for name, s in self._in_force.items()}

    # -- changing -------------------------------------------------------------------------------------

    def update(self, model: str, weights: dict[str, float] | None, shadow: Any,
               on_change: OnChange | None = None, source: str = "admin") -> Experiment:
        """Change one experiment's weights and/or shadow (``shadow=None`` removes it, ``...`` keeps it)."""
        self.router.experiment(model)  # the 404 naming the experiments

        def edit(before: Experiment | None) -> dict[str, Any]:
            if before is None:
                raise NotFoundError("model", f"unknown model {model!r}", ", ".join(self.router.models))
            unknown = set(weights or {}) - {v.name for v in before.variants}
            if unknown:
                raise RequestError("weights", f"unknown variants {sorted(unknown)}",
                                   ", ".join(v.name for v in before.variants))
            document = before.model_dump(mode="json")
            for variant in document["variants"]:
                variant["weight"] = (weights or {}).get(variant["name"], variant["weight"])
            if shadow is not ...:
                document["shadow"] = None if shadow is None else dict(shadow)
            return document

        return self._change(model, edit, source, on_change)

    def add_variant(self, model: str, name: str, tag: str, weight: float = 0.0, salt: str | None = None,
                    on_change: OnChange | None = None, source: str = "admin") -> Experiment:
        """Add a variant serving the stored model ``tag``; creates the experiment (its ``salt`` the model
        name unless given) when there is none."""
        variant = {"name": name, "model": tag, "weight": weight}

        def edit(before: Experiment | None) -> dict[str, Any]:
            if before is None:
                if not re.fullmatch(NAME_PATTERN, model):
                    raise RequestError("model", f"{model!r} is not a model name", NAME_PATTERN)
                return {"salt": salt or model, "variants": [variant]}
            if salt is not None:
                raise RequestError("salt", f"experiment {model!r} exists: its salt is kept",
                                   "no salt (it is given only when creating an experiment)")
            if before.variant(name) is not None:
                raise ConflictError("name", f"{model!r} already has a variant {name!r}",
                                    f"a name other than {', '.join(v.name for v in before.variants)}")
            document = before.model_dump(mode="json")
            document["variants"].append(variant)
            return document

        return self._change(model, edit, source, on_change)

    def remove_variant(self, model: str, name: str, force: bool = False, on_change: OnChange | None = None,
                       source: str = "admin") -> Experiment:
        """Remove a variant: refused (409) while it has weight, unless ``force``, and for the last one."""
        self.router.experiment(model)

        def edit(before: Experiment | None) -> dict[str, Any]:
            if before is None:
                raise NotFoundError("model", f"unknown model {model!r}", ", ".join(self.router.models))
            variant = before.variant(name)
            if variant is None:
                raise NotFoundError("variant", f"unknown variant {name!r} of {model!r}",
                                    ", ".join(v.name for v in before.variants))
            if len(before.variants) == 1:
                raise ConflictError("variant", f"{name!r} is the last variant of {model!r}",
                                    "add another variant first")
            if variant.weight > 0 and not force:
                raise ConflictError("variant", f"{name!r} still has weight {variant.weight:g}",
                                    "weight 0 first (PUT /experiments/{model}), or force=true")
            document = before.model_dump(mode="json")
            document["variants"] = [v for v in document["variants"] if v["name"] != name]
            return document

        return self._change(model, edit, source, on_change)

    def _change(self, model: str, edit: Callable[[Experiment | None], dict[str, Any]], source: str,
                on_change: OnChange | None) -> Experiment:
        """Read, edit, validate, declare, write compare-and-set, apply here; then ``on_change``."""
        for _ in range(WRITE_ATTEMPTS):
            with self._lock:
                if not self._reconciled:
                    self._reconcile()
                row = self._states.get(model)
                before = None if row is None else Experiment.model_validate(row.document)
                after = _validated(model, edit(before))
                self._learn(model, after)
                try:
                    version = self._states.write(model, after.model_dump(mode="json"),
                                                 None if row is None else row.version, source)
                except Conflict:
                    continue
                self._in_force = {**self._in_force, model: InForce(after, version, source)}
                self._versions = {**self._versions, model: version}
                self.refresh()
            if on_change is not None:
                on_change(before, after)
            return after
        raise ConflictError("model", f"{model!r} kept changing under {WRITE_ATTEMPTS} attempts", "a retry")


def _validated(model: str, document: Mapping[str, Any]) -> Experiment:
    try:
        return Experiment.model_validate(document)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(["experiments", model, *(str(p) for p in first["loc"])])
        raise RequestError(field, first["msg"]) from None


def _weights(document: Mapping[str, Any] | None) -> dict[str, float]:
    return {v["name"]: v["weight"] for v in document["variants"]} if document else {}
