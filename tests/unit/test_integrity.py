"""Issue 19 item 7: model artifact integrity. Every file of a stored model is hashed when it is saved
and checked when it is loaded; a changed file is refused naming the model and the file, and the
service routes around the variant that failed. Tiny real ONNX models in a private model store, real
BentoML models, real onnxruntime; no server.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import bentoml
import numpy as np
import onnx
import pytest
import yaml
from bentoml._internal.models import ModelStore

from common import config, store
from common.config import Experiment, Variant
from common.errors import UnavailableError
from experiments.ledger import Ledger
from experiments.live import LiveExperiments
from experiments.router import Router
from experiments.shadow import Shadow
from runtimes import load_runtime, preload
from serving.batching import Batcher
from serving.catalog import Catalog
from serving.dataplane import DataPlane
from serving.types import InferenceRequest
from tests import onnx_models

CLASSES = ["no", "yes"]
FEATURES = 2
ROW = np.asarray([[1.0, 0.0]], np.float32)
LABELS = {"runtime": "onnxruntime", "family": "toy", "version": "v1"}
METADATA = {"input_shape": [FEATURES], "classes": CLASSES, "onnx_input": "input",
            "onnx_probabilities_output": "probabilities"}


def tiny_model() -> onnx.ModelProto:
    return onnx_models.lookup_model(np.eye(len(CLASSES), dtype=np.float32), features=FEATURES)


def save(models: ModelStore, tag: str) -> Path:
    """The folder of a new model in ``models``, saved the way training and conversion save."""
    model = tiny_model()
    store.save(tag, labels=LABELS, metadata=METADATA,
               write=lambda folder: (onnx.save(model, folder / "model.onnx"), "model.onnx")[1],
               test_probs=np.zeros((1, len(CLASSES))), into=models)
    return Path(models.get(tag).path)


def save_without_hashes(models: ModelStore, tag: str, legacy_hash: bool) -> bentoml.Model:
    """A model as stores before hashes wrote it: no record, or the model file's hash alone."""
    with bentoml.models.create(tag, labels=LABELS, metadata=dict(METADATA), _model_store=models) as model:
        folder = Path(model.path)
        onnx.save(tiny_model(), folder / "model.onnx")
        np.save(folder / store.TEST_PROBS_FILE, np.zeros((1, len(CLASSES)), np.float32))
        model.info.metadata["file"] = "model.onnx"
        if legacy_hash:
            model.info.metadata[store.LEGACY_HASH_KEY] = store.sha256(folder / "model.onnx")
    return models.get(tag)


def served(path: Path, catalog: Catalog) -> DataPlane:
    """The data plane a worker builds over ``catalog``, its failed models left out of routing."""
    settings = config.load(path)
    ledger = Ledger(settings.store, f"sqlite:///{path.parent / 'experiments.sqlite'}",
                    {name: list(schema.classes) for name, schema in catalog.schemas.items()})
    return DataPlane(catalog, LiveExperiments(path, ledger, catalog.availability, catalog.declare),
                     Batcher(catalog.runtimes, settings.batching),
                     Shadow(catalog.runtimes, settings.service.shadow_queue, ledger), settings.limits.max_rows,
                     ledger)


def write_config(path: Path, experiments: dict) -> Path:
    path.write_text(yaml.safe_dump({"store": {"log_predictions": False}, "experiments": experiments}))
    return path


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture()
def models(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def test_every_file_is_hashed_when_saved_and_verified_when_loaded(models: ModelStore) -> None:
    folder = save(models, "toy:v1")
    recorded = models.get("toy:v1").info.metadata[store.HASHES_KEY]
    assert set(recorded) == {"model.onnx", store.TEST_PROBS_FILE}
    assert recorded["model.onnx"] == store.sha256(folder / "model.onnx")
    runtime = load_runtime(models.get("toy:v1"))
    assert runtime.integrity.status == "verified" and runtime.integrity.unchecked == ()
    assert runtime.infer(ROW).shape == (1, len(CLASSES))


@pytest.mark.parametrize("file", ["model.onnx", store.TEST_PROBS_FILE])
def test_a_changed_file_is_refused_naming_the_model_and_the_file(models: ModelStore, file: str) -> None:
    flip_a_byte(save(models, "toy:v1") / file)
    with pytest.raises(store.IntegrityError) as raised:
        load_runtime(models.get("toy:v1"))
    assert raised.value.model_tag == "toy:v1" and raised.value.file == file
    assert "toy:v1" in str(raised.value) and file in str(raised.value) and "SHA-256" in str(raised.value)


def test_a_missing_or_added_file_is_refused(models: ModelStore) -> None:
    (save(models, "toy:v1") / store.TEST_PROBS_FILE).unlink()
    with pytest.raises(store.IntegrityError, match="is missing") as raised:
        store.verify(models.get("toy:v1"))
    assert raised.value.file == store.TEST_PROBS_FILE

    (save(models, "toy:v2") / "extra.bin").write_bytes(b"\0")
    with pytest.raises(store.IntegrityError, match="was not there") as raised:
        store.verify(models.get("toy:v2"))
    assert raised.value.file == "extra.bin"


def test_models_stored_before_hashes_load_reported_unrecorded_never_verified(models: ModelStore) -> None:
    unrecorded = load_runtime(save_without_hashes(models, "old:v1", legacy_hash=False)).integrity
    assert unrecorded.status == "unrecorded" and unrecorded.verified == ()
    assert set(unrecorded.unchecked) == {"model.onnx", store.TEST_PROBS_FILE}

    partly = load_runtime(save_without_hashes(models, "old:v2", legacy_hash=True)).integrity
    assert partly.status == "unrecorded"
    assert partly.verified == ("model.onnx",) and partly.unchecked == (store.TEST_PROBS_FILE,)
    assert partly.describe() == {"status": "unrecorded", "verified": ["model.onnx"],
                                 "unchecked": [store.TEST_PROBS_FILE]}

    flip_a_byte(Path(save_without_hashes(models, "old:v3", legacy_hash=True).path) / "model.onnx")
    with pytest.raises(store.IntegrityError, match="model.onnx"):
        load_runtime(models.get("old:v3"))


def test_a_variant_that_fails_to_load_is_reported_and_routed_around(models: ModelStore,
                                                                     tmp_path: Path) -> None:
    for tag in ("toy_a:v1", "toy_b:v1", "toy_c:v1"):
        save(models, tag)
    flip_a_byte(Path(models.get("toy_b:v1").path) / "model.onnx")
    path = write_config(tmp_path / "config.yaml", {
        "mixed": {"salt": "s", "variants": [{"name": "a", "model": "toy_a:v1", "weight": 1},
                                            {"name": "b", "model": "toy_b:v1", "weight": 1}]},
        "dead": {"salt": "s", "variants": [{"name": "b", "model": "toy_b:v1", "weight": 1},
                                           {"name": "c", "model": "toy_c:v1", "weight": 0}]}})
    settings = config.load(path)
    catalog = Catalog(settings, {tag: models.get(tag) for tag in settings.model_tags()})
    catalog.load_runtimes()
    assert set(catalog.runtimes) == {"toy_a:v1", "toy_c:v1"}
    assert catalog.failures["toy_b:v1"]["file"] == "model.onnx"
    dataplane = served(path, catalog)

    answers = asyncio.run(dataplane.infer("test", [InferenceRequest("mixed", ROW, user_id=f"u{i}")
                                                   for i in range(20)]))
    assert {a.variant for a in answers} == {"a"}, "the damaged variant weighs 0"
    with pytest.raises(UnavailableError, match="toy_b:v1.*model.onnx") as pinned:
        asyncio.run(dataplane.infer("test", [InferenceRequest("mixed", ROW, variant="b")]))
    assert pinned.value.status == 503 and pinned.value.field == "variant" and pinned.value.expected == "a"
    with pytest.raises(UnavailableError, match="'dead' cannot answer.*toy_b:v1.*weight 0") as dead:
        asyncio.run(dataplane.infer("test", [InferenceRequest("dead", ROW)]))
    assert dead.value.status == 503

    health = dataplane.health()
    assert health["ready"] and health["degraded"], "one model still answers: ready, degraded"
    models_check = health["checks"]["models"]
    assert set(models_check["failed"]) == {"toy_b:v1"} and set(models_check["unavailable"]) == {"dead"}
    described = {v["model_tag"]: v for v in catalog.describe(dataplane.router)["mixed"]["variants"]}
    assert described["toy_b:v1"]["status"] == "failed" and described["toy_b:v1"]["file"] == "model.onnx"
    assert described["toy_a:v1"]["status"] == "loaded"
    assert described["toy_a:v1"]["integrity"]["status"] == "verified"


def test_a_failed_variant_loses_its_users_and_no_other_user_moves() -> None:
    experiment = Experiment(salt="s", variants=[Variant(name=n, model=f"m_{n}:v1") for n in "abc"])
    users = [f"user-{i}" for i in range(2000)]
    intact, damaged = Router({"m": experiment}), Router({"m": experiment}, failed={"m_b:v1": "damaged"})
    before = {u: intact.route("m", u).variant.name for u in users}
    after = {u: damaged.route("m", u).variant.name for u in users}
    assert "b" not in after.values() and {"a", "c"} <= set(after.values())
    assert all(after[u] == before[u] for u in users if before[u] != "b")


def test_readiness_fails_when_no_model_can_answer_or_a_check_breaks(models: ModelStore,
                                                                    tmp_path: Path) -> None:
    save(models, "toy_a:v1")
    flip_a_byte(Path(models.get("toy_a:v1").path) / "model.onnx")
    path = write_config(tmp_path / "config.yaml", {"only": {"salt": "s", "variants": [
        {"name": "a", "model": "toy_a:v1"}]}})
    catalog = Catalog(config.load(path), {"toy_a:v1": models.get("toy_a:v1")})
    catalog.load_runtimes()
    dataplane = served(path, catalog)
    assert dataplane.health()["ready"] is False

    dataplane.checks["broken"] = lambda: 1 / 0  # type: ignore[assignment, return-value]
    report = dataplane.health()["checks"]["broken"]
    assert report["ok"] is False and "ZeroDivisionError" in report["error"]


def test_preload_skips_what_it_cannot_load_and_still_imports_the_others(models: ModelStore, caplog) -> None:
    """What the parent of forked workers runs first (``serving/prefork.py``): a damaged file or an unknown
    runtime must not stop the server; the workers' own loads refuse and report those models."""
    save(models, "toy:v1")
    for tag, runtime in (("damaged:v1", "torch"), ("unknown:v1", "nope")):
        store.save(tag, labels={**LABELS, "runtime": runtime}, metadata=METADATA,
                   write=lambda folder: ((folder / "model.pt2").write_bytes(b"not a program"), "model.pt2")[1],
                   test_probs=np.zeros((1, len(CLASSES))), into=models)
    preload([models.get(tag) for tag in ("damaged:v1", "unknown:v1", "toy:v1")])
    skipped = [r.model_tag for r in caplog.records if r.getMessage().startswith("model not preloaded")]
    assert skipped == ["damaged:v1", "unknown:v1"]
