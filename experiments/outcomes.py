"""Outcome metrics per variant from the labelled prediction log: what ``/experiments/{model}/report`` shows.

Pure numpy/scipy on the arrays the experiment store returns, so the same numbers come out of the report,
the CLI and the Prometheus gauges, and a test can check them against its own arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from numpy.typing import NDArray

CONFIDENCE = 0.95
"""Level of the Wilson interval on accuracy."""
PROBABILITY_FLOOR = 1e-15
"""Probabilities are clipped to [floor, 1] before the log, so one confident miss costs ~34.5 nats, not inf."""
DELAY_QUANTILES = {"median": 0.5, "p90": 0.9}
"""Label delay, seconds from serving to feedback."""
UNLABELLED = -1
"""``actual`` of a row without a class label (unlabelled, or labelled with a reward only)."""


@dataclass(frozen=True)
class Rows:
    """Prediction-log rows, one entry per prediction, as the store returns them."""

    variant: NDArray[np.str_]
    predicted: NDArray[np.int64]
    """class index answered"""
    actual: NDArray[np.int64]
    """true class index from feedback; ``UNLABELLED`` (-1) when none"""
    reward: NDArray[np.float64]
    """numeric outcome from feedback; nan when none"""
    log_loss: NDArray[np.float64]
    """per row, -ln of the probability answered for the true class (:func:`row_scores`); nan unscored"""
    brier: NDArray[np.float64]
    """per row, the squared error of the answered probabilities against the true class; nan unscored"""
    served_at: NDArray[np.float64]
    """unix seconds"""
    labelled_at: NDArray[np.float64]
    """unix seconds of the feedback; nan while unlabelled"""

    def __post_init__(self) -> None:
        lengths = {f.name: len(getattr(self, f.name)) for f in fields(self)}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"columns differ in length: {lengths}")

    def select(self, mask: NDArray[np.bool_]) -> Rows:
        """The rows where ``mask`` holds."""
        return Rows(**{f.name: np.asarray(getattr(self, f.name))[mask] for f in fields(self)})


def per_variant(rows: Rows, classes: Sequence[str], since: float | None = None,
                variants: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """JSON-ready metrics per variant, over rows served at or after ``since`` (all rows when None).

    ``variants`` are reported even without a row, beside those present.
    """
    if since is not None:
        rows = rows.select(np.asarray(rows.served_at) >= since)
    names = np.asarray(rows.variant)
    return {str(name): metrics(rows.select(names == name), classes)
            for name in dict.fromkeys([*variants, *np.unique(names).tolist()])}


def metrics(rows: Rows, classes: Sequence[str]) -> dict[str, Any]:
    """One variant's served and labelled counts, accuracy, log loss, Brier score, confusion, reward, delay."""
    actual, reward = np.asarray(rows.actual, dtype=np.int64), np.asarray(rows.reward, dtype=float)
    labelled_at = np.asarray(rows.labelled_at, dtype=float)
    has_class, has_reward = actual != UNLABELLED, np.isfinite(reward)
    predicted = np.asarray(rows.predicted, dtype=np.int64)[has_class]
    log_loss, brier = np.asarray(rows.log_loss, dtype=float), np.asarray(rows.brier, dtype=float)
    return {
        "served": len(actual),
        "labelled": int((has_class | has_reward | np.isfinite(labelled_at)).sum()),
        "accuracy": accuracy(predicted, actual[has_class]),
        **probability_scores(log_loss[has_class], brier[has_class]),
        "confusion": confusion(predicted, actual[has_class], classes),
        "reward": mean_reward(reward[has_reward]),
        "label_delay_seconds": label_delay(np.asarray(rows.served_at, dtype=float), labelled_at),
    }


def accuracy(predicted: NDArray[np.int64], actual: NDArray[np.int64]) -> dict[str, Any] | None:
    """Share of right answers with its Wilson interval (fair near 0 and 1, unlike the normal one)."""
    if not actual.size:
        return None
    from scipy.stats import binomtest

    right = int((predicted == actual).sum())
    interval = binomtest(right, actual.size).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return {"value": right / actual.size, "low": float(interval.low), "high": float(interval.high),
            "n": int(actual.size), "confidence": CONFIDENCE}


def row_scores(probabilities: NDArray[np.float64], actual: NDArray[np.int64]) -> dict[str, NDArray[np.float64]]:
    """Per row, log loss (nats) and multi-class Brier score (summed over classes, 0..2), scored once when
    the outcome arrives, so reports never re-read the probability vectors; nan where there is no class
    label or no logged probability."""
    probabilities = np.asarray(probabilities, dtype=float).reshape(len(actual), -1)
    actual = np.asarray(actual, dtype=np.int64)
    scored = np.isfinite(probabilities).all(axis=1) & (actual >= 0) & (actual < probabilities.shape[1])
    log_loss, brier = np.full(len(actual), np.nan), np.full(len(actual), np.nan)
    p, truth = probabilities[scored], actual[scored]
    log_loss[scored] = -np.log(np.clip(p[np.arange(truth.size), truth], PROBABILITY_FLOOR, 1.0))
    brier[scored] = ((p - np.eye(probabilities.shape[1])[truth]) ** 2).sum(axis=1)
    return {"log_loss": log_loss, "brier": brier}


def probability_scores(log_loss: NDArray[np.float64], brier: NDArray[np.float64]) -> dict[str, Any]:
    """Mean log loss and Brier score over the scored rows."""
    scored = np.isfinite(log_loss) & np.isfinite(brier)
    if not scored.any():
        return {"log_loss": None, "brier": None, "scored": 0}
    return {"log_loss": float(log_loss[scored].mean()), "brier": float(brier[scored].mean()),
            "scored": int(scored.sum())}


def confusion(predicted: NDArray[np.int64], actual: NDArray[np.int64],
              classes: Sequence[str]) -> dict[str, Any]:
    """Counts of (true class, answered class): rows are the truth, columns the answer."""
    k = len(classes)
    known = (actual >= 0) & (actual < k) & (predicted >= 0) & (predicted < k)
    counts = np.bincount(actual[known] * k + predicted[known], minlength=k * k).reshape(k, k)
    return {"labels": list(classes), "matrix": counts.tolist()}


def mean_reward(rewards: NDArray[np.float64]) -> dict[str, Any] | None:
    """The mean numeric outcome, where feedback gave one."""
    return {"mean": float(rewards.mean()), "n": int(rewards.size)} if rewards.size else None


def label_delay(served_at: NDArray[np.float64], labelled_at: NDArray[np.float64]) -> dict[str, float] | None:
    """How long outcomes take to arrive, over the labelled rows."""
    delay = (labelled_at - served_at)[np.isfinite(labelled_at)]
    if not delay.size:
        return None
    return {name: float(np.quantile(delay, q)) for name, q in DELAY_QUANTILES.items()}
