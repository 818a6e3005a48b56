"""A model store that adds a deliberately degraded candidate: wine's v1 pipeline trained on shuffled
labels, stored (with its reference statistics) beside links to the test store's models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import skops.io
from bentoml._internal.models import ModelStore

from common import datasets, reference, store
from training import wine

DEGRADED = "wine_shuffled:v1"


def degraded_home(model_store: Path, folder: Path) -> Path:
    """A BENTOML_HOME in ``folder``: the test store's models linked, and :data:`DEGRADED` stored in
    this home only (the shared store is never written)."""
    home = folder / "bentoml_home"
    (home / "models").mkdir(parents=True)
    (home / "bentos").mkdir()
    for name in (model_store / "models").iterdir():
        (home / "models" / name.name).symlink_to(name)
    data = datasets.load("wine")
    shuffled = np.random.default_rng(0).permutation(data.y_train)
    pipeline = wine._pipeline("v1").fit(data.x_train, shuffled)
    probs = pipeline.predict_proba(data.x_test)
    store.save(DEGRADED, labels={"framework": "sklearn", "runtime": "sklearn", "family": "wine", "version": "v1"},
               metadata={"input_shape": data.input_shape, "classes": data.classes,
                         "feature_names": data.feature_names},
               write=lambda f: (skops.io.dump(pipeline, f / wine.MODEL_FILE), wine.MODEL_FILE)[1],
               test_probs=probs, into=ModelStore(home / "models"),
               reference=reference.compute(data.x_train, data.y_train, data.classes, data.feature_names, probs))
    return home
