"""Wine models made inside the tests: a deliberately degraded candidate (wine's v1 pipeline trained on
shuffled labels) stored beside links to the test store's models, and new good versions to import."""

from __future__ import annotations

from pathlib import Path

import bentoml
import numpy as np
import skops.io
from bentoml._internal.models import ModelStore
from sklearn.pipeline import Pipeline

from common import datasets, reference, store
from training import wine

DEGRADED = "wine_shuffled:v1"


def store_wine(tag: str, into: Path, shuffled: bool = False, c: float = 1.0,
               with_reference: bool = True) -> tuple[bentoml.Model, Pipeline]:
    """Train wine's v1 pipeline (regularization ``c``; on shuffled labels if ``shuffled``) and store it
    as ``tag`` in the model store folder ``into``, with its test probabilities and (unless not
    ``with_reference``, as models stored before references existed) its reference, as
    ``python -m training`` stores its models. Returns the stored model and the fitted pipeline."""
    data = datasets.load("wine")
    labels = np.random.default_rng(0).permutation(data.y_train) if shuffled else data.y_train
    pipeline = wine._pipeline("v1").set_params(classify__C=c).fit(data.x_train, labels)
    probs = pipeline.predict_proba(data.x_test)
    model = store.save(
        tag, labels={"framework": "sklearn", "runtime": "sklearn", "task": "classification", "family": "wine",
                     "version": tag.split(":")[1],
                     "precision": "fp32"},
        metadata={"input_shape": data.input_shape, "classes": data.classes, "feature_names": data.feature_names},
        write=lambda f: (skops.io.dump(pipeline, f / wine.MODEL_FILE), wine.MODEL_FILE)[1],
        test_probs=probs, into=ModelStore(into),
        reference=reference.compute(data.x_train, data.y_train, data.classes, data.feature_names, probs)
        if with_reference else None)
    return model, pipeline


def degraded_home(model_store: Path, folder: Path) -> Path:
    """A BENTOML_HOME in ``folder``: the test store's models linked, and :data:`DEGRADED` stored in
    this home only (the shared store is never written)."""
    home = folder / "bentoml_home"
    (home / "models").mkdir(parents=True)
    (home / "bentos").mkdir()
    for name in (model_store / "models").iterdir():
        (home / "models" / name.name).symlink_to(name)
    store_wine(DEGRADED, home / "models", shuffled=True)
    return home
