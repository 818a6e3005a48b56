"""Issue: conversion. Every source has its ONNX twins, they match the source, and bad twins are refused."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import skops.io

from common import datasets, store
from common import parity as gates
from conversion import twins, verify
from tests.e2e.conftest import run_module

pytestmark = pytest.mark.usefixtures("model_store")

SOURCES = {"digits": "torch", "cancer": "tf", "wine": "sklearn"}
VERSIONS = ("v1", "v2")
FP32_TWINS = [store.tag(f, fw, v, twin="onnx") for f, fw in SOURCES.items() for v in VERSIONS]
INT8_TWINS = [store.tag(f, fw, v, twin="onnx_int8") for f, fw in SOURCES.items() if fw != "sklearn"
              for v in VERSIONS]
TWINS = FP32_TWINS + INT8_TWINS
REQUIRED_METADATA = {"source_tag", "onnx_input", "onnx_probabilities_output", "input_shape", "input_range",
                     "dtype", "classes", "dataset", "split", "agreement", "max_prob_diff", "mean_prob_diff",
                     "accuracy", "accuracy_delta_points", "file_bytes", "times_smaller_than_source",
                     "quantized_nodes", "opset", "latency_ms", "speedup", "weight_bytes",
                     "disagreements", "test_rows", "whole_set_agreement", "whole_set_disagreements",
                     "whole_set_rows"}
SATURATION_FREE_WEIGHT = 64
"""|int8 weight| <= 64: a uint8 activation pair times such weights, 255 * 64 * 2, fits in int16, so CPUs
without VNNI (whose kernel saturates at int16) compute the same integers as those with it."""


def session(model_tag: str) -> tuple[ort.InferenceSession, str, str]:
    model = store.get(model_tag)
    loaded = ort.InferenceSession(str(store.model_file(model)), providers=["CPUExecutionProvider"])
    return loaded, model.info.metadata["onnx_input"], model.info.metadata["onnx_probabilities_output"]


def basic_types_only(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and basic_types_only(v) for k, v in value.items())
    if isinstance(value, list):
        return all(basic_types_only(v) for v in value)
    return type(value) in (str, int, float, bool)


@pytest.mark.parametrize("tag", TWINS)
def test_twin_is_stored_with_labels_and_metadata(tag: str) -> None:
    twin = store.get(tag)
    source = store.get(twin.info.metadata["source_tag"])
    labels = twin.info.labels
    assert labels["twin_of"] == str(source.tag)
    assert labels["precision"] == ("int8" if tag.split(":")[0].endswith("_int8") else "fp32")
    assert (labels["runtime"], labels["framework"]) == ("onnxruntime", "onnx")
    for key in ("family", "task", "version"):
        assert labels[key] == source.info.labels[key]
    assert REQUIRED_METADATA <= set(twin.info.metadata)
    assert basic_types_only(dict(twin.info.metadata))
    for key in ("input_shape", "input_range", "dtype", "classes", "dataset", "split"):
        assert twin.info.metadata[key] == source.info.metadata[key]
    assert twin.info.metadata["opset"] <= 18
    assert twin.info.metadata["file_bytes"] == store.model_file(twin).stat().st_size


@pytest.mark.parametrize("tag", TWINS)
def test_twin_matches_its_source_on_the_test_split(tag: str) -> None:
    twin = store.get(tag)
    source = store.get(twin.info.labels["twin_of"])
    data = datasets.load(twin.info.labels["family"])
    loaded, input_name, output_name = session(tag)
    probs = loaded.run([output_name], {input_name: data.x_test})[0]
    expected = store.stored_test_probs(source)
    parity = gates.compare(probs, expected, data.y_test)
    if twin.info.labels["precision"] == "fp32":
        assert parity.max_diff <= gates.FP32_MAX_PROB_DIFF
        np.testing.assert_array_equal(probs.argmax(1), expected.argmax(1))
    else:
        assert parity.agreement >= gates.INT8_MIN_AGREEMENT
        assert -parity.delta_points <= gates.INT8_MAX_ACCURACY_DROP_POINTS
    np.testing.assert_allclose(probs, store.stored_test_probs(twin), atol=1e-6)


@pytest.mark.parametrize("tag", INT8_TWINS)
def test_int8_twin_agrees_with_its_fp32_twin_on_the_whole_data_set(tag: str) -> None:
    """The gate holds on every row of the data set, not only the test split; the FP32 twin stands in for
    the source (its own gate makes it label every row the same)."""
    int8 = store.get(tag)
    data = datasets.load(int8.info.labels["family"])
    rows, labels = verify.whole_set(data)
    fp32_session, input_name, output_name = session(int8.info.metadata["fp32_twin"])
    int8_session = session(tag)[0]
    parity = gates.compare(int8_session.run([output_name], {input_name: rows})[0],
                            fp32_session.run([output_name], {input_name: rows})[0], labels)
    assert parity.rows == len(data.x_train) + len(data.x_test) == int8.info.metadata["whole_set_rows"]
    assert parity.agreement >= gates.INT8_MIN_AGREEMENT
    assert int8.info.metadata["whole_set_agreement"] >= gates.INT8_MIN_AGREEMENT
    assert int8.info.metadata["agreement"] >= gates.INT8_MIN_AGREEMENT


@pytest.mark.parametrize("tag", INT8_TWINS)
def test_int8_weights_cannot_saturate_a_cpu_kernel(tag: str) -> None:
    graph = onnx.load(store.model_file(store.get(tag))).graph
    weights = [onnx.numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights
    assert max(int(np.abs(w.astype(np.int16)).max()) for w in weights) <= SATURATION_FREE_WEIGHT


@pytest.mark.parametrize("tag", TWINS)
def test_twin_accepts_batches_of_1_3_and_64(tag: str) -> None:
    """A row's probabilities do not depend on the rows batched with it (INT8 activation ranges are fixed)."""
    twin = store.get(tag)
    data = datasets.load(twin.info.labels["family"])
    loaded, input_name, output_name = session(tag)
    assert loaded.get_inputs()[0].type == "tensor(float)"
    rows = data.x_test[np.arange(64) % len(data.x_test)]
    first = loaded.run([output_name], {input_name: rows[:1]})[0]
    for size in (1, 3, 64):
        probs = loaded.run([output_name], {input_name: rows[:size]})[0]
        assert probs.shape == (size, len(data.classes))
        assert probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(probs[:1], first, atol=1e-5)


@pytest.mark.parametrize("version", VERSIONS)
def test_scikit_learn_models_say_why_they_have_no_int8_twin(version: str) -> None:
    fp32 = store.get(store.tag("wine", "sklearn", version, twin="onnx"))
    assert not store.exists(store.tag("wine", "sklearn", version, twin="onnx_int8"))
    ops = {node.op_type for node in onnx.load(store.model_file(fp32)).graph.node}
    note = fp32.info.metadata["int8"]
    assert note.startswith("none: ")
    assert ("TreeEnsembleClassifier" if "TreeEnsembleClassifier" in ops else "LinearClassifier") in note


def test_neural_networks_point_to_their_int8_twin() -> None:
    for tag in INT8_TWINS:
        assert store.get(store.get(tag).info.metadata["fp32_twin"]).info.metadata["int8"] == tag
        assert store.get(tag).info.metadata["quantized_nodes"] > 0


def perturbed(model: onnx.ModelProto, scale: float) -> bytes:
    """The same graph with noise on its largest weight tensor."""
    largest = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    weights = onnx.numpy_helper.to_array(largest)
    noise = np.random.default_rng(0).normal(0.0, scale * weights.std(), weights.shape).astype(weights.dtype)
    largest.CopyFrom(onnx.numpy_helper.from_array(weights + noise, largest.name))
    return model.SerializeToString()


@pytest.mark.parametrize(("scale", "precision", "message"), [
    (0.05, "fp32", "fp32 gate vs source: max |probability difference|"),
    (3.0, "int8", "int8 gate vs source: top-1 agreement"),
])
def test_gates_reject_a_twin_with_perturbed_weights(scale: float, precision: str, message: str) -> None:
    tag = store.tag("digits", "torch", "v1", twin="onnx")
    data = datasets.load("digits")
    broken = ort.InferenceSession(perturbed(onnx.load(store.model_file(store.get(tag))), scale),
                                  providers=["CPUExecutionProvider"])
    probs = broken.run(["probabilities"], {"input": data.x_test})[0]
    source = store.get(store.tag("digits", "torch", "v1"))
    failures = gates.failures(gates.compare(probs, store.stored_test_probs(source), data.y_test),
                               precision, "source")
    assert any(f.startswith(message) for f in failures), failures


def test_cli_refuses_to_store_twins_of_a_source_with_perturbed_weights(tmp_path: Path) -> None:
    """A source whose weights changed after its test probabilities were stored (and whose file hash was
    recorded again, so the integrity check passes): the FP32 twin matches the reloaded source but not
    the stored probabilities, so it is not stored and the run fails."""
    home = tmp_path / "bentoml_home"
    shutil.copytree(Path(store.bentoml_home()) / "models" / "wine_sklearn", home / "models" / "wine_sklearn")
    skops_file = home / "models" / "wine_sklearn" / "v1" / "model.skops"
    recorded = store.sha256(skops_file)
    pipeline = skops.io.load(skops_file, trusted=skops.io.get_untrusted_types(file=skops_file))
    pipeline[-1].coef_ = pipeline[-1].coef_ * 1.5
    skops.io.dump(pipeline, skops_file)
    record = skops_file.parent / "model.yaml"
    record.write_text(record.read_text().replace(recorded, store.sha256(skops_file)))

    done = run_module("conversion", "--family", "wine", env={**os.environ, "BENTOML_HOME": str(home)})

    assert done.returncode != 0
    assert "wine_sklearn_onnx:v1: fp32 gate vs stored test probabilities: max |probability difference|" \
        in done.stderr, done.stderr
    assert "failed their gates and were not stored" in done.stderr
    stored = {p.name for p in (home / "models").iterdir()}
    assert "wine_sklearn_onnx" in stored  # v2 passed
    assert not (home / "models" / "wine_sklearn_onnx" / "v1").exists()


def test_a_source_without_a_task_label_still_gets_its_twin(tmp_path: Path) -> None:
    """A stored model lacking the ``task`` label (stored by an older version or another tool) once
    stopped the whole conversion, and ``make serve`` with it, on a KeyError: its twin is stored with
    the labels the source has."""
    home = tmp_path / "bentoml_home"
    shutil.copytree(Path(store.bentoml_home()) / "models" / "wine_sklearn" / "v1",
                    home / "models" / "wine_sklearn" / "v1")
    record = home / "models" / "wine_sklearn" / "v1" / "model.yaml"
    record.write_text("".join(line for line in record.read_text().splitlines(keepends=True)
                              if not line.strip().startswith("task:")))

    done = run_module("conversion", "--family", "wine", env={**os.environ, "BENTOML_HOME": str(home)})

    assert done.returncode == 0, done.stderr
    labels = (home / "models" / "wine_sklearn_onnx" / "v1" / "model.yaml").read_text()
    assert "twin_of: wine_sklearn:v1" in labels and "family: wine" in labels and "task:" not in labels

def test_converting_the_same_sources_again_gives_byte_identical_twins(tmp_path: Path) -> None:
    """Calibration rows are fixed and the exporters' run-dependent names are dropped, so converting the
    same sources in a new store writes the very same files."""
    home = tmp_path / "bentoml_home"
    for name in {m.tag.name for m in store.list_models() if "twin_of" not in m.info.labels}:
        shutil.copytree(Path(store.bentoml_home()) / "models" / name, home / "models" / name)

    done = run_module("conversion", env={**os.environ, "BENTOML_HOME": str(home)})

    assert done.returncode == 0, done.stderr
    for tag in TWINS:
        name, version = tag.split(":")
        again = (home / "models" / name / version / twins.ONNX_FILE).read_bytes()
        assert again == store.model_file(store.get(tag)).read_bytes(), f"{tag} differs when converted again"


def test_rerun_stores_nothing_new() -> None:
    before = {str(m.tag): m.info.creation_time for m in store.list_models()}
    done = run_module("conversion")
    assert done.returncode == 0, done.stderr
    assert "already has its ONNX twins" in done.stdout
    assert {str(m.tag): m.info.creation_time for m in store.list_models()} == before


def test_report_writes_markdown_and_chart(tmp_path: Path) -> None:
    done = run_module("conversion", "report", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    markdown = (tmp_path / "report.md").read_text()
    for tag in TWINS:
        assert f"| {tag} " in markdown and f"| {tag} " in done.stdout
    assert "no INT8 twin: TreeEnsembleClassifier has no integer kernel" in markdown
    assert "Targets" in markdown
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
