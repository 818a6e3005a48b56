"""References stored with a model (and backfilled beside it), sampled inputs, drift checks and the lease,
on real BentoML models in a private store and a real SQLite experiment store; no server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from bentoml._internal.models import ModelStore

from common import datasets, metrics, reference, store
from common.config import Experiment, Monitoring, Store, Variant
from experiments.drift import DriftMonitor
from experiments.ledger import Ledger
from experiments.monitorstore import MonitorStore
from experiments.records import AnswerRecord
from experiments.store import ExperimentStore
from tests.unit.test_integrity import save_without_hashes, tiny_model

DATA = datasets.load("wine")
PROBS = np.eye(len(DATA.classes))[DATA.y_test] * 0.9 + 0.1 / len(DATA.classes)
"""Answers as a confident model gives them on the test split."""
REFERENCE = reference.compute(DATA.x_train, DATA.y_train, DATA.classes, DATA.feature_names, PROBS)


def test_a_reference_saved_with_the_model_is_covered_by_its_hashes(tmp_path: Path) -> None:
    import onnx

    models = ModelStore(tmp_path / "models")
    store.save("toy:v1", labels={"runtime": "onnxruntime", "family": "toy", "version": "v1"},
               metadata={"input_shape": [2], "classes": ["no", "yes"]},
               write=lambda folder: (onnx.save(tiny_model(), folder / "model.onnx"), "model.onnx")[1],
               test_probs=np.zeros((1, 2)), into=models, reference=REFERENCE)
    model = models.get("toy:v1")
    assert reference.REFERENCE_FILE in store.verify(model).verified
    assert store.stored_reference(model, tmp_path)["features"]["alcohol"]["n"] == len(DATA.x_train)


def test_a_backfilled_sidecar_is_bound_to_the_model_weights(tmp_path: Path) -> None:
    models = ModelStore(tmp_path / "models")
    model = save_without_hashes(models, "toy:v1", legacy_hash=True)
    assert store.stored_reference(model, tmp_path) is None
    path = reference.sidecar_path(tmp_path, "toy", "v1")
    reference.write_sidecar(path, model.info.metadata[store.LEGACY_HASH_KEY], REFERENCE)
    assert store.stored_reference(model, tmp_path) == REFERENCE
    assert store.verify(model).status == "unrecorded"  # the model folder itself is unchanged
    reference.write_sidecar(path, "0" * 64, REFERENCE)  # made for other weights: not used
    assert store.stored_reference(model, tmp_path) is None
    reference.write_sidecar(path, model.info.metadata[store.LEGACY_HASH_KEY], REFERENCE)
    altered = json.loads(path.read_text())
    altered["reference"]["rows"] += 1
    path.write_text(json.dumps(altered))  # altered since: not used
    assert store.stored_reference(model, tmp_path) is None


def test_sampled_inputs_reach_the_store_and_a_check_is_stored(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'experiments.sqlite'}"
    settings = Monitoring(sample_fraction=1.0, check_every_s=0)
    ledger = Ledger(Store(flush_ms=10), url, {"wine": DATA.classes}, settings)
    ledger.drift = DriftMonitor(ledger.store, settings, reference=lambda tag: REFERENCE)
    rows = DATA.x_test
    probabilities = PROBS
    ids = [f"p{i}" for i in range(len(rows))]
    ledger.answer([AnswerRecord(served_at=1e9, endpoint="predict", model="wine", variant="a", model_tag="wine_x:v1",
                                pinned=False, epoch=0, latency_ms=1.0, api_key=None, prediction_ids=ids,
                                client_ids=[None] * len(rows), users=[(None, len(rows))], classes=DATA.classes,
                                probabilities=probabilities, predicted=probabilities.argmax(axis=1), inputs=rows)])
    assert ledger.log is not None
    ledger.log.close()
    inputs, answers = ledger.drift.tables.samples("wine", "a", 0, 1000)
    assert inputs.shape == rows.shape and np.allclose(np.sort(inputs, axis=0), np.sort(rows, axis=0))
    assert len(answers) == len(rows)
    experiment = Experiment(salt="s", variants=[Variant(name="a", model="wine_x:v1")])
    check = ledger.drift.check("wine", experiment, now=1e9 + 1)
    assert check["variants"]["a"]["status"] == "checked" and not check["drift"]
    assert ledger.drift.latest("wine") == check
    series = ledger.drift.tables.feature_series("wine", 0)
    assert {s["feature"] for s in series} >= set(DATA.feature_names or [])

    # The scheduled round also refreshes the outcome gauges, with no report asked for.
    truth = [DATA.classes[y] for y in DATA.y_test]
    ledger.feedback([{"prediction_id": i, "label": label} for i, label in zip(ids, truth)])
    assert ledger.drift.run_scheduled(lambda: {"wine": experiment}, also=ledger.refresh) == ["wine"]
    gauge = [s.value for m in metrics.collect() for s in m.samples
             if s.name == "bundle_outcome_accuracy" and s.labels == {"model": "wine", "variant": "a"}]
    assert gauge == [pytest.approx(np.mean(PROBS.argmax(axis=1) == DATA.y_test))]


def test_one_lease_holder_at_a_time(tmp_path: Path) -> None:
    tables = MonitorStore(ExperimentStore(f"sqlite:///{tmp_path / 'experiments.sqlite'}"))
    assert tables.acquire("drift", "worker-1", 10, now=100)
    assert not tables.acquire("drift", "worker-2", 10, now=105)
    assert tables.acquire("drift", "worker-1", 10, now=105)  # renewed until 115
    assert not tables.acquire("drift", "worker-2", 10, now=114)
    assert tables.acquire("drift", "worker-2", 10, now=116)  # expired: taken over


def test_a_scheduled_round_runs_in_one_worker_of_all(tmp_path: Path) -> None:
    """Two workers' monitors on one store: the lease holder checks every model, the other none."""
    url = f"sqlite:///{tmp_path / 'experiments.sqlite'}"
    settings = Monitoring(check_every_s=60)
    experiments = {"wine": Experiment(salt="s", variants=[Variant(name="a", model="wine_x:v1")])}
    first, second = (DriftMonitor(ExperimentStore(url), settings, reference=lambda tag: REFERENCE) for _ in range(2))
    assert first.run_scheduled(lambda: experiments) == ["wine"]
    assert second.run_scheduled(lambda: experiments) == []
    assert first.run_scheduled(lambda: experiments) == ["wine"]
    assert first.latest("wine")["variants"]["a"]["status"] == "fewer than 30 rows sampled"


def test_calibration_error() -> None:
    from experiments.timeline import _calibration_error

    right = np.array([1] * 8 + [0] * 2)
    assert _calibration_error(np.full(10, 0.8), right) == pytest.approx(0.0)  # 80 % sure, right 80 % of the time
    assert _calibration_error(np.full(10, 1.0), right) == pytest.approx(0.2)
    assert _calibration_error(np.empty(0), np.empty(0)) is None
