"""Live experiments: the weights and shadows in force, shared by every worker through config.yaml.

An admin change is validated, written to the configuration file atomically (a temporary file,
fsync, then rename, under a file lock), and applied at once in the worker that took it; every other
worker polls the file's modification time and swaps in a new router within ``POLL_S``. A restart
reads the same file, so it keeps the new weights. A crash mid-write leaves the old file whole.
"""

from __future__ import annotations

import fcntl
import io
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator, Mapping, Sequence

from pydantic import ValidationError
from ruamel.yaml import YAML

from common import config
from common.config import Config, ConfigError, Experiment
from common.errors import RequestError
from common.logs import get_logger
from experiments.router import Router

POLL_S = 0.2
log = get_logger("experiments")


class LiveExperiments:
    def __init__(self, path: Path, loaded_tags: set[str], listeners: Sequence[Callable[[Config], None]] = (),
                 failed: Mapping[str, str] | None = None):
        """``listeners`` follow the file too: each gets every configuration applied here, the first
        included (the API keys and rate limits of ``protocols/access.py``). ``failed``: why each model
        tag that failed to load did; the configuration may name them, routing leaves them out."""
        self.path = path
        self._loaded = loaded_tags
        self._failed = dict(failed or {})
        self._listeners = tuple(listeners)
        # Stamp first, then read: a change written in between is seen by the next poll.
        self._seen = self._stamp()
        first = config.load(path)
        self._models = set(first.experiments)
        self._apply(first)
        threading.Thread(target=self._watch, name="config-watch", daemon=True).start()

    def _stamp(self) -> tuple[int, int]:
        stat = self.path.stat()
        return stat.st_mtime_ns, stat.st_ino

    def _watch(self) -> None:
        while True:
            time.sleep(POLL_S)
            try:
                stamp = self._stamp()
                if stamp != self._seen:
                    self._seen = stamp
                    self._apply(config.load(self.path))
            except Exception as err:  # this thread must outlive any bad edit, or the worker stops following
                log.error("configuration change not applied", extra={"reason": str(err)})

    def _apply(self, new: Config) -> None:
        missing = set(new.model_tags()) - self._loaded - set(self._failed)
        if missing:
            raise ConfigError(f"{self.path}: models {sorted(missing)} are not loaded; restart to load them")
        if set(new.experiments) != self._models:  # the input schemas and endpoints are built at start
            raise ConfigError(f"{self.path}: experiments {sorted(set(new.experiments) ^ self._models)} were "
                              "added or removed; restart to serve them")
        self.router = Router(new.experiments, self._failed)
        for listener in self._listeners:
            listener(new)
        log.info("experiments applied", extra={"epochs": {m: self.router.epoch(m) for m in self.router.models}})

    def update(self, model: str, weights: dict[str, float] | None, shadow: Any,
               on_change: Callable[[Experiment, Experiment], None] | None = None) -> Experiment:
        """Change one experiment's weights and/or shadow (``shadow=None`` removes it, ``...`` keeps it).

        ``on_change`` gets the experiment as it was in the file and as written, once the file is written
        (the weight history records it there: only the worker that took the change does)."""
        experiment = self.router.experiment(model)
        unknown = set(weights or {}) - {v.name for v in experiment.variants}
        if unknown:
            raise RequestError("weights", f"unknown variants {sorted(unknown)}",
                               ", ".join(v.name for v in experiment.variants))
        if shadow not in (None, ...) and shadow["model"] not in self._loaded:
            raise RequestError("shadow.model", f"{shadow['model']!r} is not loaded in this service",
                               f"one of {sorted(self._loaded)} (or add it to config.yaml and restart)")
        yaml = YAML()
        yaml.preserve_quotes = True
        yaml.width = 110
        with _locked(self.path):
            document = yaml.load(self.path.read_text())
            entry = document["experiments"][model]
            for variant in entry["variants"]:
                variant["weight"] = (weights or {}).get(variant["name"], variant["weight"])
            if shadow is None:
                entry.pop("shadow", None)
            elif shadow is not ...:
                entry["shadow"] = dict(shadow)
            text = io.StringIO()
            yaml.dump(document, text)
            before = _validated(self.path.read_text()).experiments[model]
            new = _validated(text.getvalue())
            _write_atomically(self.path, text.getvalue())
            self._seen = self._stamp()
            if on_change is not None:
                on_change(before, new.experiments[model])
        self._apply(new)
        return new.experiments[model]


def _validated(text: str) -> Config:
    try:
        return Config.model_validate(YAML(typ="safe").load(text))
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "experiments"
        raise RequestError(field, first["msg"], "non-negative weights with a positive sum") from None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Two admin calls in two workers must not interleave their read-modify-write."""
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
