"""Issue 14 part B: the checks of the live model repository without a server. The parity gates
(``common/parity.py``) pass a model that reproduces its stored probabilities and refuse one that
does not, FP32 and INT8 rules apart; imports read only files under the import directory, and a
damaged archive or model is refused naming ``path``, leaving the model store as it was. Real BentoML
models in a private BENTOML_HOME, real onnxruntime.
"""

from __future__ import annotations

from pathlib import Path

import bentoml
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from bentoml._internal.models import ModelStore

from common import datasets, store
from common import parity as gates
from common.errors import ConflictError, ForbiddenError, NotFoundError, RequestError
from runtimes import load_runtime
from serving.repository import reproduces
from tests import onnx_models

FAMILY = "wine"


@pytest.fixture()
def models(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def lookup(models: ModelStore, tag: str, test_probs: np.ndarray | None = None,
           precision: str = "fp32") -> bentoml.Model:
    """A wine model whose probabilities are looked up by the first feature (an onnxruntime graph),
    its stored test probabilities its own (or ``test_probs``)."""
    data = datasets.load(FAMILY)
    features = data.x_test.shape[1]
    graph = onnx_models.lookup_model(np.random.default_rng(0).normal(size=(32, len(data.classes))).astype(np.float32),
                                     features=features)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    own = session.run(["probabilities"], {"input": data.x_test})[0]
    store.save(tag, labels={"runtime": "onnxruntime", "family": FAMILY, "version": "v1", "precision": precision},
               metadata={"input_shape": [features], "classes": data.classes, "onnx_input": "input",
                         "onnx_probabilities_output": "probabilities"},
               write=lambda folder: (onnx.save(graph, folder / "model.onnx"), "model.onnx")[1],
               test_probs=own if test_probs is None else test_probs, into=models)
    return models.get(tag)


def stored(models: ModelStore, tag: str) -> bool:
    try:
        models.get(tag)
    except bentoml.exceptions.NotFound:
        return False
    return True


def test_the_gates_pass_the_same_function_and_refuse_another() -> None:
    reference = np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)
    labels = np.array([0, 1])
    assert gates.failures(gates.compare(reference + 5e-5, reference, labels), "fp32", "stored") == []
    off = gates.failures(gates.compare(reference[::-1], reference, labels), "fp32", "stored")
    assert any("max |probability difference|" in f for f in off) and any("labels differ on 2" in f for f in off)
    assert gates.failures(gates.compare(reference + 0.05, reference, labels), "int8", "stored") == []
    assert any("top-1 agreement" in f for f in gates.failures(gates.compare(reference[::-1], reference, labels),
                                                               "int8", "stored"))


def test_a_loaded_model_is_checked_against_its_stored_probabilities(models: ModelStore) -> None:
    def check(model: bentoml.Model) -> list[str]:
        return reproduces(model, load_runtime(model))

    good = lookup(models, "wine_toy:v1")
    assert check(good) == []
    own = store.stored_test_probs(good)
    problems = check(lookup(models, "wine_toy:v2", test_probs=np.roll(own, 1, axis=1)))
    assert problems and all(p.startswith("fp32 gate vs stored test probabilities") for p in problems)
    assert "were stored" in check(lookup(models, "wine_toy:v3", test_probs=own[1:]))[0]
    slightly = own + 1e-3  # beyond the FP32 rule's 1e-4, within the INT8 rule
    assert check(lookup(models, "wine_toy:v4", test_probs=slightly))
    assert check(lookup(models, "wine_toy:v5", test_probs=slightly, precision="int8")) == []


def test_imports_read_only_whole_models_under_the_import_directory(models: ModelStore, tmp_path: Path) -> None:
    imports = tmp_path / "imports"
    imports.mkdir()
    lookup(models, "wine_toy:v1")
    archive = Path(bentoml.models.export_model("wine_toy:v1", str(imports / "toy.bentomodel"), _model_store=models))
    (tmp_path / "outside.bentomodel").write_bytes(archive.read_bytes())
    (imports / "link.bentomodel").symlink_to(tmp_path / "outside.bentomodel")
    for path in (str(tmp_path / "outside.bentomodel"), "../outside.bentomodel", "link.bentomodel"):
        with pytest.raises(ForbiddenError, match="outside the import directory") as outside:
            store.import_model(path, imports, models)
        assert outside.value.field == "path"
    with pytest.raises(ForbiddenError, match="disabled"):
        store.import_model("toy.bentomodel", None, models)
    with pytest.raises(NotFoundError):
        store.import_model("missing.bentomodel", imports, models)
    with pytest.raises(ConflictError, match="already exists"):
        store.import_model("toy.bentomodel", imports, models)

    models.delete("wine_toy:v1")
    (imports / "cut.bentomodel").write_bytes(archive.read_bytes()[:-100])
    with pytest.raises(RequestError, match="not a readable .bentomodel") as cut:
        store.import_model("cut.bentomodel", imports, models)
    assert cut.value.status == 400 and not stored(models, "wine_toy:v1")
    assert str(store.import_model("toy.bentomodel", imports, models).tag) == "wine_toy:v1"


def test_an_imported_model_whose_files_changed_is_removed_again(models: ModelStore, tmp_path: Path) -> None:
    imports = tmp_path / "imports"
    imports.mkdir()
    model = lookup(models, "wine_toy:v1")
    probs = Path(model.path) / store.TEST_PROBS_FILE
    np.save(probs, np.load(probs) + 1)  # changed after its hash was recorded
    bentoml.models.export_model("wine_toy:v1", str(imports / "changed.bentomodel"), _model_store=models)
    models.delete("wine_toy:v1")
    with pytest.raises(RequestError, match="test_probs.npy does not match") as changed:
        store.import_model("changed.bentomodel", imports, models)
    assert changed.value.field == "path" and not stored(models, "wine_toy:v1")
