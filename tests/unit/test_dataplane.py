"""Issue: layout. The data plane in process (route -> batch -> runtime -> answer -> count), on a
private model store of tiny real ONNX models built here: real BentoML models, real onnxruntime, real
batch queues and router, no trained store and no server.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from collections.abc import Callable, Iterator

import numpy as np
import onnx
import pytest
import yaml
from bentoml._internal.models import ModelStore

from common import config, metrics, store
from common.errors import NotFoundError, TooLargeError
from experiments.ledger import Ledger
from experiments.records import AnswerRecord
from experiments.live import LiveExperiments
from experiments.store import json_float32, prediction_row, user_key
from experiments.shadow import Shadow
from serving.batching import Batcher
from serving.catalog import Catalog
from serving.dataplane import DataPlane
from serving.types import InferenceRequest
from tests import onnx_models

CLASSES = ["no", "yes"]
TABLE_ROWS = 4
"""Each model looks up its answer by the first feature: 0..3 answer, anything else makes onnxruntime
fail the whole call (an out-of-range Gather), a real runtime failure."""
GOOD, BAD = [[1.0, 0.0]], [[100.0, 0.0]]


def lookup_model(favoured: int) -> onnx.ModelProto:
    logits = np.zeros((TABLE_ROWS, len(CLASSES)), np.float32)
    logits[:, favoured] = 5.0
    return onnx_models.lookup_model(logits, features=2)


@pytest.fixture(scope="module")
def private_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    models = ModelStore(tmp_path_factory.mktemp("models"))
    for name, favoured in (("toy_no", 0), ("toy_yes", 1), ("toy_shadow", 1)):
        model = lookup_model(favoured)
        store.save(f"{name}:v1", labels={"runtime": "onnxruntime", "family": "toy", "version": "v1"},
                   metadata={"input_shape": [2], "classes": CLASSES, "onnx_input": "input",
                             "onnx_probabilities_output": "probabilities"},
                   write=lambda folder, m=model: (onnx.save(m, folder / "model.onnx"), "model.onnx")[1],
                   test_probs=np.zeros((1, len(CLASSES))), into=models)
    return models


@pytest.fixture()
def dataplane(private_store: ModelStore, tmp_path: Path) -> Iterator[DataPlane]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "limits": {"max_rows": 8},
        "experiments": {"toy": {"salt": f"salt-{tmp_path.name}", "variants": [
            {"name": "no-v1", "model": "toy_no:v1", "weight": 1},
            {"name": "yes-v1", "model": "toy_yes:v1", "weight": 0}],
            "shadow": {"name": "yes-shadow", "model": "toy_shadow:v1"}}}}))
    settings = config.load(path)
    catalog = Catalog(settings, {tag: private_store.get(tag) for tag in settings.model_tags()})
    catalog.load_runtimes()
    ledger = Ledger(settings.store, f"sqlite:///{tmp_path / 'experiments.sqlite'}", {"toy": CLASSES})
    live = LiveExperiments(path, ledger, catalog.availability, catalog.declare)
    yield DataPlane(catalog, live, Batcher(catalog.runtimes, settings.batching),
                    Shadow(catalog.runtimes, settings.service.shadow_queue, ledger), settings.limits.max_rows, ledger)
    if ledger.log is not None:
        ledger.log.close()


def rows(values: list[list[float]]) -> np.ndarray:
    return np.asarray(values, np.float32)


def counted(**labels: str) -> float:
    return sum(metrics.counter_totals(metrics.collect(), "bundle_requests", (), **labels).values())


def runtime_calls(model_tag: str) -> float:
    return sum(v for (bound, v) in metrics.histogram_buckets(metrics.collect(), "bundle_batch_rows",
                                                             model_tag=model_tag) if bound == float("inf"))


def infer(dataplane: DataPlane, endpoint: str, requests: list[InferenceRequest]) -> list:
    return asyncio.run(dataplane.infer(endpoint, requests))


def test_infer_routes_by_weight_and_pins_on_request(dataplane: DataPlane) -> None:
    async def scenario() -> tuple:
        [routed] = await dataplane.infer("unit", [InferenceRequest("toy", rows(GOOD), user_id="alice")])
        [pinned] = await dataplane.infer("unit", [InferenceRequest("toy", rows(GOOD * 3), variant="yes-v1")])
        return routed, pinned

    routed, pinned = asyncio.run(scenario())
    assert (routed.variant, routed.model_tag, routed.pinned, routed.labels) == ("no-v1", "toy_no:v1", False, ["no"])
    assert (pinned.variant, pinned.model_tag, pinned.pinned, pinned.labels) == ("yes-v1", "toy_yes:v1", True,
                                                                               ["yes"] * 3)
    assert np.allclose(np.sum(pinned.probabilities, axis=1), 1.0)


def test_infer_answers_in_order_with_one_runtime_call_per_variant(dataplane: DataPlane) -> None:
    before = {tag: runtime_calls(tag) for tag in ("toy_no:v1", "toy_yes:v1")}
    requests = [InferenceRequest("toy", rows(GOOD), variant="yes-v1"),
                InferenceRequest("toy", rows(GOOD * 2)),
                InferenceRequest("toy", rows(GOOD), variant="yes-v1"),
                InferenceRequest("toy", rows(GOOD), user_id="bob")]
    answers = infer(dataplane, "unit", requests)
    assert [(a.variant, a.labels) for a in answers] == [("yes-v1", ["yes"]), ("no-v1", ["no", "no"]),
                                                        ("yes-v1", ["yes"]), ("no-v1", ["no"])]
    assert [len(a.probabilities) for a in answers] == [1, 2, 1, 1]
    assert {tag: runtime_calls(tag) - before[tag] for tag in before} == {"toy_no:v1": 1, "toy_yes:v1": 1}


def test_a_failing_runtime_call_is_counted_and_the_next_one_is_served(dataplane: DataPlane) -> None:
    errors = counted(endpoint="unit-fail", outcome="error", variant="no-v1")

    async def scenario() -> list:
        with pytest.raises(Exception, match="(?i)gather|index|out of bounds"):
            await dataplane.infer("unit-fail", [InferenceRequest("toy", rows(BAD))])
        return (await dataplane.infer("unit-fail", [InferenceRequest("toy", rows(GOOD))]))[0].labels

    assert asyncio.run(scenario()) == ["no"]
    assert counted(endpoint="unit-fail", outcome="error", variant="no-v1") - errors == 1
    with pytest.raises(Exception, match="(?i)gather|index|out of bounds"):
        infer(dataplane, "unit-fail", [InferenceRequest("toy", rows(BAD))])
    assert counted(endpoint="unit-fail", outcome="error", variant="no-v1") - errors == 2


def test_client_errors_name_the_field(dataplane: DataPlane) -> None:
    with pytest.raises(NotFoundError, match="unknown model 'nope'") as unknown:
        dataplane.rows("nope", GOOD, "inputs")
    assert unknown.value.expected == "toy"
    with pytest.raises(NotFoundError, match="unknown variant 'c'"):
        infer(dataplane, "unit", [InferenceRequest("toy", rows(GOOD), variant="c")])
    with pytest.raises(TooLargeError, match="9 rows is more than the limit"):
        dataplane.rows("toy", GOOD * 9, "inputs")
    assert dataplane.rows("toy", GOOD[0], "inputs").shape == (1, 2)


def test_shadow_sees_a_copy_and_its_agreement_is_counted(dataplane: DataPlane) -> None:
    def shadow(outcome: str) -> float:
        return sum(metrics.counter_totals(metrics.collect(), "bundle_shadow", (), model="toy", outcome=outcome,
                                          variant="yes-shadow").values())

    before = shadow("disagree")
    answers = infer(dataplane, "unit", [InferenceRequest("toy", rows(GOOD * 2))])
    assert answers[0].variant == "no-v1"  # the shadow never answers
    for _ in range(200):
        if shadow("disagree") - before == 2:
            break
        asyncio.run(asyncio.sleep(0.01))
    assert shadow("disagree") - before == 2


def wait_for(check: Callable[[], bool], deadline_s: float = 10.0) -> bool:
    """Poll ``check`` until it holds or the deadline passes (the log writes off the request path)."""
    end = time.monotonic() + deadline_s
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def test_a_logged_row_names_its_user_or_else_its_request() -> None:
    """A request without a user is randomized whole: its rows carry its first prediction id as
    ``request_id``, the unit the sample-ratio test counts once (a user's rows carry none)."""
    record = AnswerRecord(served_at=0.0, endpoint="predict", model="toy", variant="a", model_tag="toy:v1",
                          pinned=False, epoch="e", latency_ms=1.0, api_key=None,
                          prediction_ids=["p0", "p1", "p2", "p3", "p4", "p5"], client_ids=[None] * 6,
                          users=[("u1", 2), (None, 3), (None, 1)], classes=["no", "yes"],
                          probabilities=np.full((6, 2), 0.5), predicted=np.zeros(6, np.int64),
                          inputs=np.zeros((6, 1)))
    rows = record.rows(hash_users=False)
    assert [(r.user_key, r.request_id) for r in rows] == [
        ("u1", None), ("u1", None), (None, "p2"), (None, "p2"), (None, "p2"), (None, "p5")]


def test_a_logged_row_is_the_row_the_store_builds_from_its_columns() -> None:
    """The writer builds rows as tuples straight from the record: the same as ``prediction_row`` of the
    columns one by one, with the probabilities as JSON (a vector with a NaN included, which is not finite)."""
    probabilities = np.array([[0.25, 0.75], [np.nan, 0.5]], dtype=np.float32)
    record = AnswerRecord(served_at=1.5, endpoint="predict", model="toy", variant="a", model_tag="toy:v1",
                          pinned=True, epoch="e", latency_ms=2.0, api_key="k", prediction_ids=["p0", "p1"],
                          client_ids=["c0", None], users=[("u1", 2)], classes=["no", "yes"],
                          probabilities=probabilities, predicted=np.array([1, 0]), inputs=np.zeros((2, 1)))
    rows = record.rows(hash_users=False)
    assert rows[0] == prediction_row({
        "prediction_id": "p0", "client_id": "c0", "served_at": 1.5, "model": "toy", "variant": "a",
        "model_tag": "toy:v1", "pinned": True, "epoch": "e", "user_key": "u1", "request_id": None, "api_key": "k",
        "endpoint": "predict", "label": "yes", "label_index": 1, "top_probability": 0.75,
        "probabilities": [0.25, 0.75], "latency_ms": 2.0})
    assert json.loads(rows[0].probabilities) == [0.25, 0.75]
    assert rows[1].probabilities == json_float32(probabilities[1].tolist())


def test_every_row_gets_an_id_that_feedback_joins_for_live_and_shadow(dataplane: DataPlane) -> None:
    """Issue 13: ids per row, client ids echoed, the log and the shadow's answers written under the
    same id, and feedback graded against both (a real SQLite store)."""
    ledger = dataplane.ledger
    answers = infer(dataplane, "unit", [InferenceRequest("toy", rows(GOOD * 2), user_id="u1", ids=("a", "b")),
                                        InferenceRequest("toy", rows(GOOD), user_id="u2")])
    ids = [i for a in answers for i in a.prediction_ids]
    assert len(set(ids)) == 3 and answers[0].ids == ["a", "b"] and answers[1].ids is None
    assert answers[0].row(1).prediction_id == ids[1] and answers[0].row(1).id == "b"
    assert wait_for(lambda: len(ledger.store.joined_shadow("toy")) == 0 and ledger.log.status()["written"] >= 3)

    results = ledger.feedback([{"prediction_id": ids[0], "label": "no"}, {"id": "b", "label": 1},
                               {"prediction_id": ids[2], "label": "no"}, {"prediction_id": "nope", "label": "no"}])
    assert [r["status"] for r in results] == ["matched", "matched", "matched", "unknown_id"]
    joined = ledger.store.joined("toy")
    assert sorted(joined.prediction_id) == sorted(ids)
    assert set(joined.user_key) == {user_key("u1", True), user_key("u2", True)}  # hashed by default
    assert wait_for(lambda: len(ledger.store.joined_shadow("toy")) == 3)
    pairs = ledger.store.joined_shadow("toy")
    assert set(pairs.shadow_variant) == {"yes-shadow"} and (pairs.shadow_predicted == 1).all()

    experiment = dataplane.router.experiment("toy")
    report = ledger.outcomes("toy", experiment, dataplane.router.epoch("toy"))
    assert report["variants"]["no-v1"]["accuracy"]["value"] == pytest.approx(2 / 3)
    decision = ledger.decide("toy", experiment, dataplane.router.epoch("toy"), metrics.collect())
    assert [c["variant"] for c in decision["candidates"]] == ["yes-v1"]
    assert decision["candidates"][0]["verdict"] == "continue"  # 200 labels per variant are needed first
    assert decision["shadow"]["discordant"] == {"live_only": 2, "shadow_only": 1}
