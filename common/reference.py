"""Reference statistics of a model: what its inputs and answers looked like when it was made.

Drift is judged against these (``experiments/drift.py``). Training and conversion compute them from
the training split and the model's own test-split probabilities and store them in the model folder
(``reference.json``, covered by the integrity hashes, exported with ``bentoml models export``).
Models stored before references existed get a *sidecar* from ``python -m training.backfill``: a file
beside the model store, bound to the SHA-256 that the model recorded for its weights, because adding
a file to a stored model's folder would fail its integrity check (``common/store.verify``).

The same :func:`features` turns training rows and live rows into the same named one-dimensional
samples: a tabular model's columns; for images, the pixel intensity and two cheap per-image summaries.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any
from collections.abc import Mapping, Sequence

import numpy as np

REFERENCE_FILE = "reference.json"
SIDECAR_FOLDER = "references"
"""Folder of backfilled references in the model store's home: ``references/<name>/<version>.json``."""
FORMAT = 1
BINS = 10
"""Histogram bins per feature, at the training split's deciles (PSI's usual choice)."""
SAMPLE_MAX = 2000
"""Training values kept per feature for the two-sample KS test (evenly spaced quantiles beyond it)."""
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
IMAGE_FEATURES = ("pixel_intensity", "image_mean", "image_std")


def kind_of(input_shape: Sequence[int]) -> str:
    """``image`` for 2-D inputs (digits' 8x8), ``tabular`` for a row of named features."""
    return "image" if len(input_shape) >= 2 else "tabular"


def feature_names(kind: str, names: Sequence[str] | None, width: int) -> list[str]:
    if kind == "image":
        return list(IMAGE_FEATURES)
    return list(names) if names else [f"x{i}" for i in range(width)]


def features(rows: np.ndarray, kind: str, names: Sequence[str], rng: np.random.Generator | None = None
             ) -> dict[str, np.ndarray]:
    """Named one-dimensional samples of ``rows``. For images, ``pixel_intensity`` pools every pixel of
    the training images (the reference) but takes one random pixel per live image (``rng`` given), so
    the live sample's values are independent, as the KS test assumes."""
    rows = np.asarray(rows, dtype=np.float64)
    if kind == "tabular":
        flat = rows.reshape(len(rows), -1)
        return {name: flat[:, i] for i, name in enumerate(names)}
    flat = rows.reshape(len(rows), -1)
    pixels = (flat.ravel() if rng is None or not len(flat)
              else flat[np.arange(len(flat)), rng.integers(0, flat.shape[1], len(flat))])
    return {"pixel_intensity": pixels, "image_mean": flat.mean(axis=1), "image_std": flat.std(axis=1)}


def summarize(values: np.ndarray) -> dict[str, Any]:
    """One feature's reference: summary, quantiles, decile histogram and a sample for the KS test."""
    values = np.sort(np.asarray(values, dtype=np.float64))
    edges = np.unique(np.quantile(values, np.linspace(0, 1, BINS + 1)[1:-1]))
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    sample = values if len(values) <= SAMPLE_MAX else np.quantile(values, np.linspace(0, 1, SAMPLE_MAX))
    return {"n": len(values), "mean": float(values.mean()), "std": float(values.std()),
            "min": float(values[0]), "max": float(values[-1]),
            "quantiles": {str(q): float(np.quantile(values, q)) for q in QUANTILES},
            "edges": edges.tolist(), "counts": counts.tolist(), "sample": sample.tolist()}


def compute(x_train: np.ndarray, y_train: np.ndarray, classes: Sequence[str], names: Sequence[str] | None,
            test_probs: np.ndarray) -> dict[str, Any]:
    """The reference of a model trained on ``x_train``/``y_train`` that gave ``test_probs`` on the test split."""
    kind = kind_of(x_train.shape[1:])
    named = feature_names(kind, names, int(np.prod(x_train.shape[1:])))
    prior = np.bincount(y_train, minlength=len(classes)) / len(y_train)
    predicted = np.bincount(test_probs.argmax(axis=1), minlength=len(classes)) / len(test_probs)
    return {"format": FORMAT, "kind": kind, "rows": len(x_train), "classes": list(classes),
            "features": {name: summarize(values) for name, values in features(x_train, kind, named).items()},
            "class_prior": prior.tolist(), "predictions": predicted.tolist(),
            "confidence": summarize(test_probs.max(axis=1))}


def write(folder: Path, reference: Mapping[str, Any]) -> None:
    (folder / REFERENCE_FILE).write_text(json.dumps(reference, separators=(",", ":")))


def sidecar_path(home: Path, name: str, version: str) -> Path:
    return home / SIDECAR_FOLDER / name / f"{version}.json"


def write_sidecar(path: Path, model_file_sha256: str, reference: Mapping[str, Any]) -> None:
    """A backfilled reference bound to the model's recorded weights hash, with its own hash."""
    body = json.dumps(reference, separators=(",", ":"), sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model_file_sha256": model_file_sha256,
                                "reference_sha256": hashlib.sha256(body.encode()).hexdigest(),
                                "reference": reference}))


def read_sidecar(path: Path, model_file_sha256: str) -> dict[str, Any] | None:
    """The backfilled reference, or None when absent, made for other weights, or altered since."""
    try:
        stored = json.loads(path.read_text())
        body = json.dumps(stored["reference"], separators=(",", ":"), sort_keys=True)
    except (OSError, ValueError, KeyError, TypeError):  # absent or unreadable: no reference, never a crash
        return None
    if (stored.get("model_file_sha256") != model_file_sha256
            or hashlib.sha256(body.encode()).hexdigest() != stored.get("reference_sha256")):
        return None
    return dict(stored["reference"])
