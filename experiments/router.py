"""Weighted, sticky, rampable assignment of requests to the variants of an experiment.

Layout: a user id is hashed with the experiment's salt into one of ``BUCKETS`` fixed buckets. Each
bucket holds, per variant, a fixed pseudo-random number ``u`` in (0, 1) that depends only on the
salt, the bucket and the variant *name*, never on the weights. A bucket belongs to the variant with
the smallest ``-ln(u) / weight`` (weighted rendezvous hashing), which gives variant ``v`` the share
``weight_v / sum(weights)`` of the buckets. Raising one weight lowers only that variant's scores, so
buckets can only move *into* it and none leaves it; lowering a weight only moves buckets out of it.
The table depends on nothing but the salt, names and weights, so every worker and every restart
computes the same assignment, and the same user always lands in the same variant while the weights
stay as they are. Requests without a user id are drawn at random by weight.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from collections.abc import Mapping

import numpy as np

from common.config import Experiment, Variant
from common.errors import NotFoundError, UnavailableError

BUCKETS = 100_000
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _seed(*parts: str) -> int:
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def bucket_of(salt: str, user_id: str) -> int:
    """Stable across processes and restarts, unlike Python's salted ``hash()``."""
    return _seed(salt, user_id) % BUCKETS


def _uniforms(salt: str, variant: str) -> np.ndarray:
    """One fixed number in (0, 1) per bucket for this variant (splitmix64 over the bucket index)."""
    with np.errstate(over="ignore"):
        z = np.uint64(_seed(salt, variant)) + np.arange(BUCKETS, dtype=np.uint64) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


@dataclass(frozen=True)
class Route:
    variant: Variant
    pinned: bool


def epoch(experiment: Experiment) -> str:
    """A short name for the weights in force, so traffic is compared with the weights that sent it."""
    weights = ",".join(f"{v.name}={v.weight:g}" for v in experiment.variants)
    return f"{_seed(experiment.salt, weights):016x}"[:8]


class _Table:
    """The bucket -> variant table of one experiment; a weight change builds a new one. A variant whose
    model failed to load weighs 0: its buckets go to the others, and come back once it loads."""

    def __init__(self, experiment: Experiment, failed: Mapping[str, str]):
        self.experiment = experiment
        self.variants = experiment.variants
        self.epoch = epoch(experiment)
        self.failed = {v.name: failed[v.model] for v in self.variants if v.model in failed}
        weights = [0.0 if v.name in self.failed else v.weight for v in self.variants]
        top = max(weights)  # scale-free: 1e308s cannot overflow, 5e-324s cannot vanish
        self.unavailable = None if top > 0 else self._why_unavailable()
        if self.unavailable:
            return
        self._weights = [w / top for w in weights]
        neg_log_u = np.stack([-np.log(_uniforms(experiment.salt, v.name)) for v in self.variants])
        with np.errstate(divide="ignore", over="ignore"):
            scores = neg_log_u / np.asarray(self._weights, dtype=np.float64)[:, None]
        self.owner = np.argmin(scores, axis=0).astype(np.int32)

    def _why_unavailable(self) -> str:
        failed = "; ".join(f"variant {v.name} ({v.model}) failed to load: {self.failed[v.name]}"
                           for v in self.variants if v.name in self.failed)
        idle = len(self.failed) < len(self.variants)
        return failed + ("; the others have weight 0" if idle else "")

    def variant_for(self, user_id: str) -> Variant:
        return self.variants[self.owner[bucket_of(self.experiment.salt, user_id)]]

    def random_variant(self) -> Variant:
        return random.choices(self.variants, weights=self._weights)[0]


class Router:
    """Immutable once built: a weight change builds a new Router and swaps it in whole, so a request
    routes against one consistent set of weights."""

    def __init__(self, experiments: Mapping[str, Experiment], failed: Mapping[str, str] | None = None):
        """``failed``: why each model tag that failed to load did (its variants get no traffic)."""
        self._tables = {name: _Table(e, failed or {}) for name, e in experiments.items()}

    def epoch(self, model: str) -> str:
        return self._table(model).epoch

    @property
    def models(self) -> list[str]:
        return list(self._tables)

    def experiment(self, model: str) -> Experiment:
        return self._table(model).experiment

    def failed(self, model: str) -> dict[str, str]:
        """The variants of ``model`` whose model failed to load, with why."""
        return dict(self._table(model).failed)

    def unavailable(self, model: str) -> str | None:
        """Why no variant of ``model`` can answer (each failed to load, or the rest weigh 0), or None."""
        return self._table(model).unavailable

    def route(self, model: str, user_id: str | None = None, variant: str | None = None) -> Route:
        """The variant that answers; 503 (``UnavailableError``) naming why when it cannot."""
        table = self._table(model)
        if variant is not None:
            chosen = table.experiment.variant(variant)
            if chosen is None:
                names = ", ".join(v.name for v in table.variants)
                raise NotFoundError("variant", f"unknown variant {variant!r} of {model!r}", names)
            if chosen.name in table.failed:
                serving = ", ".join(v.name for v in table.variants if v.name not in table.failed)
                raise UnavailableError("variant", f"variant {variant!r} of {model!r} ({chosen.model}) failed "
                                       f"to load: {table.failed[chosen.name]}", serving or None)
            return Route(chosen, pinned=True)
        if table.unavailable:
            raise UnavailableError("model", f"{model!r} cannot answer: {table.unavailable}")
        if user_id is not None:
            return Route(table.variant_for(user_id), pinned=False)
        return Route(table.random_variant(), pinned=False)

    def _table(self, model: str) -> _Table:
        try:
            return self._tables[model]
        except KeyError:
            raise NotFoundError("model", f"unknown model {model!r}", ", ".join(self._tables)) from None
