"""One source model's ONNX twins: export, quantize, verify against the source, measure, store."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bentoml
import onnx

from common import datasets, reference, store
from common import parity as gates
from common.logs import get_logger
from conversion import latency, onnx_model, quantize, verify
from conversion.source import INPUT, PROBABILITIES, THREADS, Source, load

log = get_logger("conversion")

FP32, INT8 = "fp32", "int8"
TWIN_SUFFIX = {FP32: "onnx", INT8: "onnx_int8"}
ONNX_FILE = "model.onnx"
SCHEMA_KEYS = ("input_shape", "input_range", "dtype", "feature_names", "classes", "dataset", "split")
"""What a runtime needs to validate a request, copied from the source so a twin serves on its own."""
SOURCE_LABELS = ("family", "task", "version")
"""The source's descriptive labels, copied to its twins when the source has them."""
SOURCE, STORED, WHOLE = "source", "stored test probabilities", "source on the whole data set"


@dataclass
class Outcome:
    """What happened to one twin in this run."""

    source: str
    twin: str
    precision: str
    status: str
    metadata: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def twin_tag(model: bentoml.Model, precision: str) -> str:
    labels = model.info.labels
    return store.tag(labels["family"], labels["framework"], labels["version"], twin=TWIN_SUFFIX[precision])


def pending(model: bentoml.Model) -> bool:
    """True while a twin this source should have is not in the store."""
    fp32_tag = twin_tag(model, FP32)
    if not store.exists(fp32_tag):
        return True
    has_no_int8 = str(store.get(fp32_tag).info.metadata.get("int8", "")).startswith("none")
    return not has_no_int8 and not store.exists(twin_tag(model, INT8))


def convert(model: bentoml.Model, replace: bool = False) -> list[Outcome]:
    """Both twins of ``model``; each is stored only if it passes its gates (and is new, or ``replace``)."""
    data = datasets.load(model.info.labels["family"])
    source = load(model)
    exported = source.export()
    shape, n_classes = model.info.metadata["input_shape"], len(data.classes)
    fp32 = onnx_model.finish(exported, shape, n_classes)
    no_int8 = quantize.unavailable(exported)
    job = _Job(source, data, replace)
    outcomes = [job.twin(FP32, fp32, {"int8": f"none: {no_int8}" if no_int8 else twin_tag(model, INT8)})]
    if no_int8:
        return [*outcomes, Outcome(str(model.tag), "", INT8, f"none: {no_int8}")]
    if outcomes[0].failures:
        return [*outcomes, Outcome(str(model.tag), twin_tag(model, INT8), INT8,
                                   "not built: the FP32 graph it would quantize failed its gate")]
    quantized = quantize.quantize(fp32, data.x_train)
    int8 = onnx_model.finish(onnx.load_from_string(quantized.onnx), shape, n_classes)
    return [*outcomes, job.twin(INT8, int8, {"quantization": quantized.settings, "fp32_twin": twin_tag(model, FP32),
                                             "times_smaller_than_fp32": len(fp32) / len(int8)})]


class _Job:
    """What every twin of one source is checked against: its reloaded and its stored probabilities on the
    test split, its probabilities on the whole data set, and its latency measured once."""

    def __init__(self, source: Source, data: datasets.Dataset, replace: bool):
        self.model, self.data, self.replace = source.model, data, replace
        self.whole_rows, self.whole_labels = verify.whole_set(data)
        self.references = {SOURCE: source.predict(data.x_test), STORED: store.stored_test_probs(source.model)}
        self.whole_reference = source.predict(self.whole_rows)
        self.source_latency = latency.profile(source.predict, data.x_test)
        self.common = _common_metadata(source)

    def twin(self, precision: str, onnx_bytes: bytes, extra: dict[str, Any]) -> Outcome:
        tag = twin_tag(self.model, precision)
        session = onnx_model.session(onnx_bytes)
        probs = onnx_model.probabilities(session, self.data.x_test)
        parities = {against: gates.compare(probs, reference, self.data.y_test)
                    for against, reference in self.references.items()}
        parities[WHOLE] = gates.compare(onnx_model.probabilities(session, self.whole_rows), self.whole_reference,
                                         self.whole_labels)
        failures = [message for against, parity in parities.items()
                    for message in gates.failures(parity, precision, against)]
        twin_latency = latency.profile(lambda rows: onnx_model.probabilities(session, rows), self.data.x_test)
        metadata = {**self.common, **extra, **_measurements(onnx_bytes, parities, self.source_latency, twin_latency),
                    "times_smaller_than_source": self.common["source_file_bytes"] / len(onnx_bytes)}
        if failures:
            status = "REJECTED (gate failed)"
        elif store.exists(tag) and not self.replace:
            status = "kept (already stored)"
        else:
            store.save(tag, labels=_labels(self.model, precision), metadata=metadata, write=_writer(onnx_bytes),
                       test_probs=probs, replace=self.replace,
                       reference=reference.compute(self.data.x_train, self.data.y_train, self.data.classes,
                                                   self.data.feature_names, probs))
            log.info("stored", extra={"tag": tag, "agreement": parities[SOURCE].agreement})
            status = "stored"
        return Outcome(str(self.model.tag), tag, precision, status, metadata, failures)


def _common_metadata(source: Source) -> dict[str, Any]:
    meta = source.model.info.metadata
    return {
        **{key: meta[key] for key in SCHEMA_KEYS if key in meta},
        "source_tag": str(source.model.tag),
        "source_framework": source.model.info.labels["framework"],
        "source_file_bytes": int(meta["file_bytes"]),
        "exporter": source.exporter,
        "onnx_input": INPUT,
        "onnx_probabilities_output": PROBABILITIES,
        "library_versions": store.library_versions("onnx", "onnxruntime", *source.libraries),
    }


def _measurements(onnx_bytes: bytes, parities: dict[str, gates.Parity], source_latency: dict[str, float],
                  twin_latency: dict[str, float]) -> dict[str, Any]:
    graph = onnx.load_from_string(onnx_bytes)
    opsets = onnx_model.opsets(graph)
    parity = parities[SOURCE]
    return {
        "opset": opsets["ai.onnx"],
        "opsets": opsets,
        "agreement": parity.agreement,
        "disagreements": parity.disagreements,
        "test_rows": parity.rows,
        "max_prob_diff": parity.max_diff,
        "mean_prob_diff": parity.mean_diff,
        "max_prob_diff_vs_stored": parities[STORED].max_diff,
        "whole_set_agreement": parities[WHOLE].agreement,
        "whole_set_disagreements": parities[WHOLE].disagreements,
        "whole_set_rows": parities[WHOLE].rows,
        "whole_set_max_prob_diff": parities[WHOLE].max_diff,
        "accuracy": parity.accuracy,
        "source_accuracy": parity.reference_accuracy,
        "accuracy_delta_points": parity.delta_points,
        "file_bytes": len(onnx_bytes),
        "weight_bytes": onnx_model.weight_bytes(graph),
        "quantized_nodes": onnx_model.quantized_nodes(graph),
        "latency_ms": {"source": source_latency, "twin": twin_latency},
        "speedup": latency.speedups(source_latency, twin_latency),
        "latency_method": f"median of up to {latency.MAX_CALLS} calls within {latency.BUDGET_S}s, "
                          f"{THREADS} thread per runtime, source and twin in the same process",
    }


def _labels(model: bentoml.Model, precision: str) -> dict[str, str]:
    """The source's descriptive labels that it has (a model stored by an older version or another tool
    may lack ``task``: one such model stopped ``make serve`` with a KeyError), then the twin's own."""
    source = model.info.labels
    return {**{key: source[key] for key in SOURCE_LABELS if key in source},
            "twin_of": str(model.tag), "precision": precision, "runtime": "onnxruntime", "framework": "onnx"}


def _writer(onnx_bytes: bytes):
    def write(folder: Path) -> str:
        (folder / ONNX_FILE).write_bytes(onnx_bytes)
        return ONNX_FILE

    return write
