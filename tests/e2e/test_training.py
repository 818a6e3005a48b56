"""Issue: foundation. Every demo model is stored, accurate, reloadable, and training is idempotent."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from common import datasets, store
from runtimes import load_runtime
from tests.e2e.conftest import ROOT, run_module

pytestmark = pytest.mark.usefixtures("model_store")

SOURCES = [store.tag(f, fw, v) for f, fw in (("digits", "torch"), ("cancer", "tf"), ("wine", "sklearn"))
           for v in ("v1", "v2")]
MIN_ACCURACY = {"digits": 0.95, "cancer": 0.95, "wine": 0.93}
METADATA_KEYS = {"dataset", "input_shape", "dtype", "classes", "metrics", "train_size", "test_size",
                 "train_seconds", "library_versions", "format", "file", "split"}


@pytest.mark.parametrize("tag", SOURCES)
def test_stored_with_labels_and_metadata(tag: str) -> None:
    model = store.get(tag)
    family, version = tag.split("_")[0], tag.split(":")[1]
    assert model.info.labels["family"] == family
    assert model.info.labels["version"] == version
    assert model.info.labels["task"] == "classification"
    assert model.info.labels["framework"] in {"torch", "tf", "sklearn"}
    assert METADATA_KEYS <= set(model.info.metadata)
    data = datasets.load(family)
    assert model.info.metadata["classes"] == data.classes
    assert model.info.metadata["input_shape"] == data.input_shape
    assert model.info.metadata["test_size"] == len(data.x_test)
    if family != "digits":
        assert model.info.metadata["feature_names"] == data.feature_names


@pytest.mark.parametrize("tag", SOURCES)
def test_accuracy_meets_the_bar(tag: str) -> None:
    family = tag.split("_")[0]
    metrics = store.get(tag).info.metadata["metrics"]
    assert metrics["accuracy"] >= MIN_ACCURACY[family]
    assert 0 < metrics["macro_f1"] <= 1


@pytest.mark.parametrize("tag", SOURCES)
def test_reloaded_model_predicts_what_it_did_at_training(tag: str) -> None:
    model = store.get(tag)
    data = datasets.load(tag.split("_")[0])
    probabilities = load_runtime(model).predict(data.x_test)
    recorded = store.stored_test_probs(model)
    np.testing.assert_array_equal(probabilities.argmax(1), recorded.argmax(1))
    np.testing.assert_allclose(probabilities, recorded, atol=1e-6)
    accuracy = float((probabilities.argmax(1) == data.y_test).mean())
    assert accuracy == pytest.approx(model.info.metadata["metrics"]["accuracy"])


def test_rerun_adds_no_models() -> None:
    before = sorted(str(m.tag) for m in store.list_models())
    done = run_module("training")
    assert done.returncode == 0, done.stderr
    assert "already in the store" in done.stdout
    assert sorted(str(m.tag) for m in store.list_models()) == before


def test_tensorflow_then_torch_in_one_process() -> None:
    """The service loads every runtime in each worker, in the configuration's order."""
    code = ("from runtimes import load_runtime; from common.store import get; import numpy as np;"
            "load_runtime(get('cancer_tf:v1')).predict(np.zeros((1, 30), np.float32));"
            "print(load_runtime(get('digits_torch:v1')).predict(np.zeros((1, 8, 8), np.float32)).shape)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(1, 10)"
