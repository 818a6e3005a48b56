"""What the dashboard shows of one experiment, over time: numbers only, rendered by ``protocols/monitoring.py``.

Time series share one axis (``buckets`` equal slices of the last ``window_s`` seconds): traffic per
variant against its weight, accuracy per variant with a Wilson interval and its expected calibration
error (windows by time; the newest ``quality_window_labels`` labels give the window by count), and every drift check's PSI
per feature; beside them the latency quantiles, shadow agreement, label delay, the decision and the
weight history. Everything is read from the experiment store (shared by workers and replicas).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from common.config import Experiment, Monitoring
from experiments.ledger import Ledger

SERVED_LIMIT = 200_000
"""Logged answers read for the traffic and latency series at most (the newest)."""
CONFIDENCE = 0.95
LATENCY_QUANTILES = (50, 95)
HISTORY_ROWS = 20
CALIBRATION_BINS = 10
MIN_SPAN_S = 60.0
"""The time axis covers at least this much: from the oldest answer in the window (a young service's
traffic spreads over the buckets instead of filling the last one) up to now."""


def build(ledger: Ledger, model: str, experiment: Experiment, settings: Monitoring,
          now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    window = now - settings.dashboard_window_s
    names = [v.name for v in experiment.variants]
    tables = ledger.drift.tables
    served = tables.served(model, window, SERVED_LIMIT)
    oldest = float(served["served_at"].min()) if len(served["served_at"]) else window
    since = max(window, min(oldest, now - MIN_SPAN_S))
    edges = np.linspace(since, now, settings.dashboard_buckets + 1)
    history = ledger.store.history(model, HISTORY_ROWS)
    weights = _weights_over_time(history, {v.name: v.weight for v in experiment.variants}, edges)
    slot = np.clip(np.searchsorted(edges, served["served_at"], side="right") - 1, 0, len(edges) - 2)
    per_bucket = np.bincount(slot, minlength=len(edges) - 1).astype(float)
    traffic: dict[str, Any] = {}
    latency: dict[str, Any] = {}
    for variant in experiment.variants:
        mine = served["variant"] == variant.name
        counts = np.bincount(slot[mine], minlength=len(edges) - 1)
        share = np.divide(counts, per_bucket, out=np.full(len(counts), np.nan), where=per_bucket > 0)
        traffic[variant.name] = {"rows": counts.tolist(), "share": _listed(share),
                                 "weight_share": [w.get(variant.name, 0.0) for w in weights]}
        values = served["latency_ms"][mine]
        latency[variant.name] = {f"p{q}": (float(np.percentile(values, q)) if values.size else None)
                                 for q in LATENCY_QUANTILES}
    graded = tables.graded(model, since)
    accuracy: dict[str, Any] = {}
    labelled_slot = np.clip(np.searchsorted(edges, graded["served_at"], side="right") - 1, 0, len(edges) - 2)
    newest = slice(-settings.quality_window_labels, None)  # rows are oldest first
    for name in names:
        rows = graded["variant"] == name
        right, confidence = graded["correct"][rows], graded["confidence"][rows]
        correct = np.bincount(labelled_slot[rows], weights=right, minlength=len(edges) - 1)
        total = np.bincount(labelled_slot[rows], minlength=len(edges) - 1)
        points = [_wilson(int(round(k)), int(n)) for k, n in zip(correct, total)]
        slots = labelled_slot[rows]
        calibration = [_calibration_error(confidence[slots == b], right[slots == b]) for b in range(len(edges) - 1)]
        accuracy[name] = {"points": points, "labelled": total.tolist(), "calibration_error": calibration,
                          "overall": _wilson(int(right.sum()), int(right.size)),
                          "latest": {"labels": int(right[newest].size),
                                     "accuracy": _wilson(int(right[newest].sum()), int(right[newest].size)),
                                     "calibration_error": _calibration_error(confidence[newest], right[newest])}}
    drift = tables.feature_series(model, since)
    return {"model": model, "now": now, "since": since, "edges": edges.tolist(), "variants": names,
            "weights": {v.name: v.weight for v in experiment.variants}, "traffic": traffic,
            "accuracy": accuracy, "latency_ms": latency, "shadow": tables.shadow_agreement(model, since),
            "labels": ledger.store.label_counts(model, ledger.settings.label_horizon_days * 86_400, now),
            "drift": drift, "latest_drift": ledger.drift.latest(model),
            "decisions": ledger.store.decisions(model, HISTORY_ROWS), "history": history}


def _weights_over_time(history: list[dict[str, Any]], current: dict[str, float],
                       edges: np.ndarray) -> list[dict[str, float]]:
    """Each bucket's weight shares: those in force at its end, from the weight history (newest first)."""
    out = []
    for end in edges[1:]:
        before = next((h for h in history if h["at"] <= end), None)  # the latest change up to the bucket's end
        after = [h for h in history if h["at"] > end]
        weights = (before["new_weights"] if before else after[-1]["old_weights"] if after else current)
        total = sum(weights.values()) or 1.0
        out.append({name: w / total for name, w in weights.items()})
    return out


def _wilson(correct: int, total: int) -> dict[str, float] | None:
    """Accuracy with its Wilson score interval, or None without labels."""
    if not total:
        return None
    from scipy import stats

    interval = stats.binomtest(correct, total).proportion_ci(CONFIDENCE, method="wilson")
    return {"value": correct / total, "low": float(interval.low), "high": float(interval.high), "n": total}


def _calibration_error(confidence: np.ndarray, correct: np.ndarray) -> float | None:
    """Expected calibration error: the gap between confidence and accuracy, averaged over equal-width
    confidence bins weighted by their rows (0 for a model whose 80 %-sure answers are right 80 % of the time)."""
    if not confidence.size:
        return None
    bins = np.minimum((confidence * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)
    rows = np.bincount(bins, minlength=CALIBRATION_BINS)
    gap = np.abs(np.bincount(bins, weights=correct.astype(float), minlength=CALIBRATION_BINS)
                 - np.bincount(bins, weights=confidence, minlength=CALIBRATION_BINS))
    return float(gap.sum() / rows.sum())


def _listed(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]
