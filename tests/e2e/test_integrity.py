"""Issue 19 items 7 and 3, by real HTTP against ``bentoml serve`` over a small model store of its own.

Item 7: models re-saved through ``common/store.py`` (so every file's hash is recorded), one of them
then damaged on disk by a flipped byte, one copied as an older store holds it (no record). The server
starts and serves what is intact; ``/readyz`` and ``GET /models`` name the damaged model and file.

Item 3: shape errors say what fits, in the three protocols, with the feature names as a body field
where the protocol's error shape has room for it.

The same server serves both: ONNX and scikit-learn models only, one worker, so it starts quickly.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from collections.abc import Iterator

import bentoml
import httpx
import numpy as np
import pytest
import yaml
from bentoml._internal.models import ModelStore

from common import datasets, store
from harness.server import ServerProcess
from tests import ROOT

pytestmark = pytest.mark.slow  # servers, databases or builds of its own

DAMAGED = "wine_sklearn_onnx:v2"
RESAVED = ("wine_sklearn:v1", DAMAGED, "cancer_tf_onnx:v2", "cancer_tf_onnx_int8:v2")
AS_STORED = "digits_torch_onnx:v2"
"""Copied from the test store with its record of every file's hash taken out, as models stored before
hashes were recorded are (only the main file's legacy hash is kept)."""
EXPERIMENTS = {
    "wine": {"salt": "w", "variants": [{"name": "sklearn-v1", "model": "wine_sklearn:v1"},
                                       {"name": "onnx-v2", "model": DAMAGED}]},
    "cancer": {"salt": "c", "variants": [{"name": "onnx-v2", "model": "cancer_tf_onnx:v2"},
                                         {"name": "onnx-int8-v2", "model": "cancer_tf_onnx_int8:v2"}]},
    "digits": {"salt": "d", "variants": [{"name": "onnx-v2", "model": AS_STORED}]},
}
WINE_ROW = datasets.load("wine").x_test[0].tolist()
CANCER_ROW = datasets.load("cancer").x_test[0].tolist()


def resave(tag: str, into: ModelStore) -> None:
    """A stored model saved again the way training and conversion save, so every file's hash is
    recorded; its own files, labels and metadata otherwise."""
    source = bentoml.models.get(tag)
    metadata = {k: v for k, v in source.info.metadata.items()
                if k not in ("file", "file_bytes", store.LEGACY_HASH_KEY, store.HASHES_KEY)}

    def write(folder: Path) -> str:
        shutil.copy(store.model_file(source), folder / source.info.metadata["file"])
        return str(source.info.metadata["file"])

    store.save(tag, labels=dict(source.info.labels), metadata=metadata, write=write,
               test_probs=store.stored_test_probs(source), into=into)


def forget_hashes(model_yaml: Path) -> None:
    """Make a stored model look saved before every file was hashed: the main file's hash only."""
    info = yaml.safe_load(model_yaml.read_text())
    hashes = info["metadata"].pop(store.HASHES_KEY, None)
    if hashes is not None:
        info["metadata"][store.LEGACY_HASH_KEY] = hashes[info["metadata"]["file"]]
    model_yaml.write_text(yaml.safe_dump(info))


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def server(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("integrity")
    home = folder / "bentoml_home"
    models = ModelStore(home / "models")
    for tag in RESAVED:
        resave(tag, models)
    name, version = AS_STORED.split(":")
    shutil.copytree(model_store / "models" / name / version, home / "models" / name / version)
    (home / "models" / name / "latest").write_text(version)
    forget_hashes(home / "models" / name / version / "model.yaml")
    flip_a_byte(store.model_file(models.get(DAMAGED)))
    config_path = folder / "config.yaml"
    config_path.write_text(yaml.safe_dump({"service": {"workers": 1}, "experiments": EXPERIMENTS}))
    env = {**os.environ, "BENTOML_HOME": str(home), "BUNDLE_CONFIG": str(config_path)}
    running = ServerProcess("service:Bundle", ROOT, env, folder)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


# --- Item 7: integrity ---------------------------------------------------------------------------

def test_readyz_serves_degraded_and_names_the_damaged_model_and_file(client: httpx.Client) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["ready"] is True and report["degraded"] is True
    models = report["checks"]["models"]
    assert list(models["failed"]) == [DAMAGED] and models["unavailable"] == {}
    failure = models["failed"][DAMAGED]
    assert failure["file"] == "model.onnx" and DAMAGED in failure["error"] and "SHA-256" in failure["error"]
    assert models["integrity_unrecorded"] == [AS_STORED]


def test_models_lists_each_variant_with_its_load_state_and_integrity(client: httpx.Client) -> None:
    catalogue = client.get("/models").json()
    wine = {v["model_tag"]: v for v in catalogue["wine"]["variants"]}
    assert wine[DAMAGED]["status"] == "failed" and wine[DAMAGED]["file"] == "model.onnx"
    assert DAMAGED in wine[DAMAGED]["error"]
    assert wine["wine_sklearn:v1"]["status"] == "loaded"
    assert wine["wine_sklearn:v1"]["integrity"] == {"status": "verified",
                                                    "verified": ["model.skops", store.TEST_PROBS_FILE]}
    [digits] = catalogue["digits"]["variants"]
    assert digits["integrity"]["status"] == "unrecorded", "never reported verified without a record"
    assert store.TEST_PROBS_FILE in digits["integrity"]["unchecked"]


def test_oip_and_tfserving_report_the_failed_version(client: httpx.Client) -> None:
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2/models/wine/ready").json()["ready"] is True
    assert client.get("/v2/models/wine/versions/onnx-v2/ready").json()["ready"] is False
    states = {s["version"]: s for s in client.get("/v1/models/wine").json()["model_version_status"]}
    assert states["sklearn-v1"]["state"] == "AVAILABLE" and states["onnx-v2"]["state"] == "END"
    assert "model.onnx" in states["onnx-v2"]["status"]["error_message"]


def test_the_damaged_experiment_serves_its_intact_variant(client: httpx.Client) -> None:
    for user in range(20):
        response = client.post("/predict", json={"instances": [{"model": "wine", "inputs": WINE_ROW,
                                                                "user_id": f"user-{user}"}]})
        assert response.status_code == 200, response.text
        assert response.json()[0]["variant"] == "sklearn-v1"
    assert client.post("/v1/models/wine:predict", json={"instances": [WINE_ROW]}).status_code == 200


def test_a_request_pinned_to_the_damaged_variant_gets_503_naming_why(client: httpx.Client) -> None:
    native = client.post("/predict", json={"instances": [{"model": "wine", "inputs": WINE_ROW,
                                                          "variant": "onnx-v2"}]})
    assert native.status_code == 503, native.text
    assert native.json()["field"] == "variant" and "model.onnx" in native.json()["error"]
    oip = client.post("/v2/models/wine/versions/onnx-v2/infer", json={"inputs": [
        {"name": "input", "shape": [1, 13], "datatype": "FP32", "data": WINE_ROW}]})
    assert oip.status_code == 503 and DAMAGED in oip.json()["error"]


def test_the_other_models_answer(client: httpx.Client) -> None:
    for model, row in (("cancer", CANCER_ROW), ("digits", np.zeros((8, 8)).tolist())):
        response = client.post("/predict", json={"instances": [{"model": model, "inputs": row}]})
        assert response.status_code == 200, response.text


# --- Item 3: shape errors that say what fits -----------------------------------------------------

def test_predict_shape_error_says_what_fits_and_lists_the_features(client: httpx.Client) -> None:
    response = client.post("/predict", json={"instances": [{"model": "cancer", "inputs": [1, 2, 3]}]})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == ("instances.0.inputs: cancer expects 30 features per row "
                             "(shape (N, 30) or (30,)); got shape (3,)")
    assert body["field"] == "instances.0.inputs" and body["expected_shape"] == ["N", 30]
    assert body["features"] == list(datasets.load("cancer").feature_names)


def test_predict_ndarray_and_images_say_the_expected_shape(client: httpx.Client) -> None:
    response = client.post("/predict_ndarray", json={"model": "digits", "inputs": [[0.0] * 64]})
    assert response.status_code == 400, response.text
    message = "digits expects 8x8 images (shape (N, 8, 8) or (8, 8)); got shape (1, 64)"
    assert message in response.json()["error"]
    assert response.json()["expected_shape"] == ["N", 8, 8] and "features" not in response.json()


def test_oip_shape_and_datatype_errors_name_the_expected_ones(client: httpx.Client) -> None:
    shape = client.post("/v2/models/cancer/infer", json={"inputs": [
        {"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]})
    assert shape.status_code == 400 and list(shape.json()) == ["error"]
    message = "cancer expects 30 features per row (shape (N, 30) or (30,)); got shape (1, 3)"
    assert message in shape.json()["error"]
    datatype = client.post("/v2/models/cancer/infer", json={"inputs": [
        {"name": "input", "shape": [1, 30], "datatype": "BYTES", "data": ["x"] * 30}]})
    assert datatype.status_code == 400 and "'BYTES'" in datatype.json()["error"]
    assert "FP32" in datatype.json()["error"]


def test_tfserving_errors_tell_rows_from_a_lone_row(client: httpx.Client) -> None:
    lone_row = client.post("/v1/models/cancer:predict", json={"instances": CANCER_ROW})
    assert lone_row.status_code == 400 and list(lone_row.json()) == ["error"]
    assert "cancer expects 30 features per row (shape (N, 30)); got shape (30,)" in lone_row.json()["error"]
    assert "batch of one" in lone_row.json()["error"]
    short = client.post("/v1/models/cancer:predict", json={"inputs": [[1, 2, 3]]})
    assert short.status_code == 400 and "got shape (1, 3)" in short.json()["error"]
    both = client.post("/v1/models/cancer:predict", json={"instances": [CANCER_ROW], "inputs": [CANCER_ROW]})
    assert both.status_code == 400 and '"instances" (rows) or "inputs" (columns)' in both.json()["error"]
