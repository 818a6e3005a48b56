"""Drift: the sampled live inputs and the logged answers of each variant against its model's reference.

Per input feature: the population stability index over the reference's decile bins (how much it
moved) and a two-sample Kolmogorov-Smirnov test against the training values (whether that can be
chance); the predicted classes by a chi-square test against the test-split prediction distribution, the
top probability (confidence) by KS. The p-values of one variant are corrected together (Holm, or
Benjamini-Hochberg), and a test flags drift only when it is both significant after correction and
material (PSI at or above ``psi_threshold``): with a few dozen rows PSI alone is noise, with many
thousand rows a significant KS alone is a shift too small to act on.

Checks run on demand (``POST /experiments/{model}/drift``) and on a schedule in exactly one worker
of all replicas (a lease in the experiment store); results are stored as a time series per model,
variant and feature and exported as Prometheus gauges (``bundle_drift_*``).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any
from collections.abc import Callable, Mapping, Sequence

import bentoml
import numpy as np

from common import metrics
from common import store as model_store
from common.config import Drift, Experiment, Monitoring
from common.reference import features
from experiments.monitorstore import MonitorStore
from experiments.schedule import LeasedRound
from experiments.store import ExperimentStore


PSI_FLOOR = 1e-4
"""Smallest bin share in the PSI (an empty bin would make it infinite)."""
PREDICTIONS, CONFIDENCE = "__predictions__", "__confidence__"
TOP = 3
"""Drifting features named first in a check's ``top``."""
LEASE = "drift-check"
LEASE_TTL_PERIODS = 2.0
"""A lease outlives two schedule periods: a holder that died is replaced within two periods."""
RETENTION_S = 30 * 86_400
"""Samples and drift series kept this long (as the prediction log's default retention)."""


def psi(edges: Sequence[float], reference_counts: Sequence[int], live: np.ndarray) -> float:
    """Population stability index of ``live`` over the reference's bins (``edges`` inner, open ends)."""
    expected = np.asarray(reference_counts, dtype=float)
    observed = np.bincount(np.searchsorted(np.asarray(edges), live, side="right"), minlength=len(expected))
    return _psi(expected, observed.astype(float))


def _psi(expected: np.ndarray, observed: np.ndarray) -> float:
    e = np.maximum(expected / expected.sum(), PSI_FLOOR)
    o = np.maximum(observed / max(observed.sum(), 1.0), PSI_FLOOR)
    return float(np.sum((o - e) * np.log(o / e)))


def adjust(p_values: Sequence[float], method: str) -> np.ndarray:
    """p-values corrected across one family: Holm's step-down (family-wise error) or
    Benjamini-Hochberg (false discovery rate, scipy's ``false_discovery_control``)."""
    p = np.asarray(p_values, dtype=float)
    if not p.size:
        return p
    if method == "bh":
        from scipy import stats

        return np.asarray(stats.false_discovery_control(p, method="bh"))
    order = np.argsort(p)
    stepped = np.maximum.accumulate((len(p) - np.arange(len(p))) * p[order])
    out = np.empty_like(p)
    out[order] = np.minimum(stepped, 1.0)
    return out


def compare(reference: Mapping[str, Any], inputs: np.ndarray, answers: np.ndarray, settings: Drift,
            rng: np.random.Generator) -> dict[str, Any]:
    """One variant's live sample against its reference: per feature (and for the predicted classes and
    the confidence) PSI, the test's statistic and p-value (raw and adjusted) and ``drift``."""
    from scipy import stats

    tests: dict[str, dict[str, Any]] = {}
    if len(inputs) >= settings.min_rows:
        names = list(reference["features"])
        live = features(inputs, reference["kind"], names, rng)
        for name in names:
            ref = reference["features"][name]
            values = live[name]
            ks = stats.ks_2samp(ref["sample"], values)
            tests[name] = {"psi": psi(ref["edges"], ref["counts"], values), "statistic": float(ks.statistic),
                           "p_value": float(ks.pvalue), "mean": float(values.mean()),
                           "reference_mean": ref["mean"], "test": "ks"}
    if len(answers) >= settings.min_rows:
        classes = len(reference["predictions"])
        observed = np.bincount(answers[:, 0].astype(int), minlength=classes).astype(float)
        expected_share = np.maximum(np.asarray(reference["predictions"], dtype=float), PSI_FLOOR)
        expected = observed.sum() * expected_share / expected_share.sum()
        chi = stats.chisquare(observed, expected)
        tests[PREDICTIONS] = {"psi": _psi(expected, observed), "statistic": float(chi.statistic),
                              "p_value": float(chi.pvalue), "shares": (observed / observed.sum()).tolist(),
                              "reference_shares": list(reference["predictions"]), "test": "chi-square"}
        conf = reference["confidence"]
        ks = stats.ks_2samp(conf["sample"], answers[:, 1])
        tests[CONFIDENCE] = {"psi": psi(conf["edges"], conf["counts"], answers[:, 1]),
                             "statistic": float(ks.statistic), "p_value": float(ks.pvalue),
                             "mean": float(answers[:, 1].mean()), "reference_mean": conf["mean"], "test": "ks"}
    adjusted = adjust([t["p_value"] for t in tests.values()], settings.correction)
    for test, p_adj in zip(tests.values(), adjusted):
        test["p_adjusted"] = float(p_adj)
        test["drift"] = bool(p_adj < settings.alpha and test["psi"] >= settings.psi_threshold)
    drifting = sorted((n for n, t in tests.items() if t["drift"]), key=lambda n: -tests[n]["psi"])
    return {"rows": len(inputs), "answers": len(answers), "tests": tests, "drift": bool(drifting),
            "drifting": drifting,
            "top": [{"feature": n, "psi": tests[n]["psi"], "why": _why(n, tests[n], settings)} for n in drifting[:TOP]],
            "status": "checked" if tests else f"fewer than {settings.min_rows} rows sampled"}


def _why(name: str, test: Mapping[str, Any], settings: Drift) -> str:
    moved = (f"mean {test['reference_mean']:.4g} -> {test['mean']:.4g}" if "mean" in test
             else "class shares " + ", ".join(f"{a:.2f}->{b:.2f}" for a, b in
                                              zip(test["reference_shares"], test["shares"])))
    return (f"{name}: PSI {test['psi']:.2f} >= {settings.psi_threshold:g}, {test['test']} p={test['p_adjusted']:.2g} "
            f"({settings.correction}-adjusted) < {settings.alpha:g}; {moved}")


class DriftMonitor:
    """Drift checks of one service: run, store, export; and the schedule held by one worker of all."""

    def __init__(self, store: ExperimentStore, settings: Monitoring,
                 reference: Callable[[str], dict[str, Any] | None] | None = None):
        self.settings = settings
        self.tables = MonitorStore(store)
        self._reference = reference or _stored_reference
        self._references: dict[str, dict[str, Any] | None] = {}
        self._schedule = LeasedRound(self.tables, LEASE, f"{socket.gethostname()}:{os.getpid()}:{id(self):x}",
                                     settings.check_every_s, LEASE_TTL_PERIODS)

    def reference(self, model_tag: str) -> dict[str, Any] | None:
        if model_tag not in self._references:
            self._references[model_tag] = self._reference(model_tag)
        return self._references[model_tag]

    def check(self, model: str, experiment: Experiment, now: float | None = None) -> dict[str, Any]:
        """Every live variant of ``model`` against its model's reference, stored and exported."""
        now = time.time() if now is None else now
        rules = self.settings.drift
        rng = np.random.default_rng()
        variants: dict[str, Any] = {}
        rows: list[dict[str, Any]] = []
        for variant in experiment.variants:
            reference = self.reference(variant.model)
            if reference is None:
                variants[variant.name] = {"model_tag": variant.model, "drift": False, "tests": {}, "top": [],
                                          "drifting": [], "status": "no reference statistics: run "
                                          "`python -m training.backfill`"}
                continue
            inputs, answers = self.tables.samples(model, variant.name, now - rules.window_s, rules.window_rows)
            result = compare(reference, inputs, answers, rules, rng)
            variants[variant.name] = {"model_tag": variant.model, **result}
            for name, test in result["tests"].items():
                rows.append({"variant": variant.name, "feature": name, "rows": result["rows"],
                             "psi": test["psi"], "statistic": test["statistic"], "p_value": test["p_value"],
                             "p_adjusted": test["p_adjusted"], "drift": test["drift"]})
        top = sorted(({"variant": v, **t} for v, r in variants.items() for t in r["top"]),
                     key=lambda t: -t["psi"])[:TOP]
        detail = {"model": model, "at": now, "settings": rules.model_dump(), "variants": variants,
                  "drift": any(r["drift"] for r in variants.values()), "top": top}
        self.tables.record_check(model, detail, rows, now)
        self._export(model, variants, now)
        return detail

    def latest(self, model: str) -> dict[str, Any] | None:
        return self.tables.latest_check(model)

    @staticmethod
    def _export(model: str, variants: Mapping[str, Mapping[str, Any]], now: float) -> None:
        for variant, result in variants.items():
            metrics.DRIFT_CHECKED.labels(model=model, variant=variant).set(now)
            for feature, test in result["tests"].items():
                labels = {"model": model, "variant": variant, "feature": feature}
                metrics.DRIFT_PSI.labels(**labels).set(test["psi"])
                metrics.DRIFT_P_VALUE.labels(**labels).set(test["p_adjusted"])
                metrics.DRIFT_DETECTED.labels(**labels).set(1.0 if test["drift"] else 0.0)

    # -- the schedule ---------------------------------------------------------------------------------

    def schedule(self, experiments: Callable[[], Mapping[str, Experiment]],
                 also: Callable[[str, Experiment], Any] | None = None) -> None:
        """Check every model each ``check_every_s`` in whichever worker holds the lease (0: never), and
        run ``also`` for each model in the same round (the outcome gauges), so that periodic work on the
        store happens in one worker of all, not in every one."""
        if self.settings.check_every_s:
            self._schedule.every_period(lambda: self.run_scheduled(experiments, also))

    def close(self) -> None:
        self._schedule.close()

    def run_scheduled(self, experiments: Callable[[], Mapping[str, Experiment]],
                      also: Callable[[str, Experiment], Any] | None = None) -> list[str]:
        """One scheduled round: the models checked (none when another worker holds the lease)."""
        return self._schedule.run(lambda: self._round(experiments, also)) or []

    def _round(self, experiments: Callable[[], Mapping[str, Experiment]],
               also: Callable[[str, Experiment], Any] | None) -> list[str]:
        checked = []
        for model, experiment in experiments().items():
            self.check(model, experiment)
            if also is not None:
                also(model, experiment)
            checked.append(model)
        self.tables.prune(time.time() - RETENTION_S)
        return checked


def _stored_reference(model_tag: str) -> dict[str, Any] | None:
    try:
        return model_store.stored_reference(bentoml.models.get(model_tag))
    except bentoml.exceptions.NotFound:
        return None
