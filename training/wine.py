"""wine: scikit-learn Pipelines stored with skops, which loads only types it is told to trust."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import skops.io
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from common.datasets import Dataset

FRAMEWORK = "sklearn"
MODEL_FILE = "model.skops"
VERSIONS: dict[str, dict[str, Any]] = {
    "v1": {"estimator": "LogisticRegression", "C": 1.0, "max_iter": 1000},
    "v2": {"estimator": "RandomForestClassifier", "n_estimators": 100, "max_depth": 6},
}


def _pipeline(version: str) -> Pipeline:
    hp = VERSIONS[version]
    if hp["estimator"] == "LogisticRegression":
        estimator = LogisticRegression(C=hp["C"], max_iter=hp["max_iter"])
    else:
        estimator = RandomForestClassifier(
            n_estimators=hp["n_estimators"], max_depth=hp["max_depth"], random_state=0, n_jobs=1
        )
    return Pipeline([("scale", StandardScaler()), ("classify", estimator)])


def train(data: Dataset, version: str):
    from training.base import Trained

    pipeline = _pipeline(version).fit(data.x_train, data.y_train)

    def predict_proba(rows: np.ndarray) -> np.ndarray:
        return pipeline.predict_proba(rows).astype(np.float32)

    def write(folder: Path) -> str:
        skops.io.dump(pipeline, folder / MODEL_FILE)
        return MODEL_FILE

    return Trained(
        framework=FRAMEWORK,
        format="skops",
        write=write,
        predict_proba=predict_proba,
        hyperparameters=VERSIONS[version],
        libraries=("scikit-learn", "skops"),
    )
