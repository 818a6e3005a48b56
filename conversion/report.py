"""The stored twins against their sources: a markdown table, the targets, and a size/latency chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bentoml

from common import store, tables
from conversion import latency

TARGET_TIMES_SMALLER_THAN_FP32 = 3.5
TARGET_SPEEDUP_BATCH_1 = 2.0
TARGET_MAX_ACCURACY_DROP_POINTS = 0.5
TARGET_MIN_AGREEMENT = 0.998
"""Margin over the gate's 99.5% (common.parity.INT8_MIN_AGREEMENT), so that another CPU's kernels, or a training
that lands a row nearer the decision boundary, cannot fail it by one row."""
NEURAL_FRAMEWORKS = ("torch", "tf")
"""The targets are for the INT8 twins of the neural networks; trees and linear models have none."""

METRIC_HEADERS = ["agreement test", "agreement whole set", "max |Δp|", "accuracy", "Δ points", "size KiB", "size ratio source/twin",
                  *[f"b{size} {column}" for size in latency.BATCHES
                    for column in ("source ms", "twin ms", "speed-up")]]
HEADERS = ["source", "twin", "precision", *METRIC_HEADERS]


def metric_cells(meta: dict[str, Any]) -> list[str]:
    """The measured columns of one twin, from its metadata (stored, or about to be)."""
    times, speedup = meta["latency_ms"], meta["speedup"]
    whole = f"{meta['whole_set_agreement']:.2%}" if "whole_set_agreement" in meta else "not measured"
    cells = [f"{meta['agreement']:.2%}", whole, f"{meta['max_prob_diff']:.2g}", f"{meta['accuracy']:.2%}",
             f"{meta['accuracy_delta_points']:+.2f}", f"{meta['file_bytes'] / 1024:.1f}",
             f"{meta['times_smaller_than_source']:.2f}x"]
    for size in latency.BATCHES:
        batch = f"batch_{size}"
        cells += [f"{times['source'][batch]:.3f}", f"{times['twin'][batch]:.3f}", f"{speedup[batch]:.1f}x"]
    return cells


def twins(families: list[str] | None = None) -> dict[str, dict[str, bentoml.Model]]:
    """Stored twins by source tag, then by precision."""
    found: dict[str, dict[str, bentoml.Model]] = {}
    for model in store.list_models(runtime="onnxruntime"):
        labels = model.info.labels
        if "twin_of" in labels and (not families or labels["family"] in families):
            found.setdefault(labels["twin_of"], {})[labels["precision"]] = model
    return dict(sorted(found.items()))


def rows(found: dict[str, dict[str, bentoml.Model]]) -> list[list[str]]:
    table = []
    for source_tag, by_precision in found.items():
        for precision in ("fp32", "int8"):
            twin = by_precision.get(precision)
            if twin is not None:
                table.append([source_tag, str(twin.tag), precision, *metric_cells(twin.info.metadata)])
            elif precision == "int8":
                reason = _no_int8_reason(by_precision.get("fp32"))
                table.append([source_tag, f"no INT8 twin: {reason}", precision, *[""] * len(METRIC_HEADERS)])
    return table


def _no_int8_reason(fp32: bentoml.Model | None) -> str:
    note = str(fp32.info.metadata.get("int8", "")) if fp32 is not None else ""
    if note.startswith("none: "):
        return note.removeprefix("none: ")
    return "not stored (it failed its gate or was not converted; run `python -m conversion`)"


def target_rows(found: dict[str, dict[str, bentoml.Model]]) -> list[list[str]]:
    table = []
    for by_precision in found.values():
        int8 = by_precision.get("int8")
        if int8 is None or int8.info.metadata["source_framework"] not in NEURAL_FRAMEWORKS:
            continue
        meta, fp32 = int8.info.metadata, by_precision["fp32"].info.metadata
        smaller, speedup, delta = meta["times_smaller_than_fp32"], meta["speedup"]["batch_1"], meta["accuracy_delta_points"]
        whole = meta.get("whole_set_agreement")
        graph_kib = (meta["file_bytes"] - meta["weight_bytes"]) / 1024
        checks = [
            (f"file >= {TARGET_TIMES_SMALLER_THAN_FP32}x smaller than the FP32 twin", f"{smaller:.2f}x",
             smaller >= TARGET_TIMES_SMALLER_THAN_FP32,
             f"initializers {fp32['weight_bytes'] / meta['weight_bytes']:.2f}x smaller; the graph itself "
             f"(nodes, tensor names) is {graph_kib:.1f} of the {meta['file_bytes'] / 1024:.1f} KiB"),
            (f"batch 1 >= {TARGET_SPEEDUP_BATCH_1}x faster than {meta['source_framework']}", f"{speedup:.1f}x",
             speedup >= TARGET_SPEEDUP_BATCH_1, ""),
            (f"accuracy drop <= {TARGET_MAX_ACCURACY_DROP_POINTS} points", f"{delta:+.2f} points",
             -delta <= TARGET_MAX_ACCURACY_DROP_POINTS, ""),
            (f"test-split agreement >= {TARGET_MIN_AGREEMENT:.1%}", f"{meta['agreement']:.2%}",
             meta["agreement"] >= TARGET_MIN_AGREEMENT,
             f"{meta['disagreements']} of {meta['test_rows']} test rows change label"),
            (f"whole-set agreement >= {TARGET_MIN_AGREEMENT:.1%}",
             f"{whole:.2%}" if whole is not None else "not measured",
             whole is not None and whole >= TARGET_MIN_AGREEMENT,
             (f"{meta['whole_set_disagreements']} of {meta['whole_set_rows']} rows change label"
              if whole is not None else "converted before the whole-set gate: run `python -m conversion --reconvert`")),
        ]
        table += [[str(int8.tag), target, shown, "met" if met else "MISSED", "" if met else why]
                  for target, shown, met, why in checks]
    return table


def quantization_rows(found: dict[str, dict[str, bentoml.Model]]) -> list[list[str]]:
    """How each INT8 twin was quantized, and which weighted layers it keeps in FP32."""
    table = []
    for by_precision in found.values():
        int8 = by_precision.get("int8")
        if int8 is None:
            continue
        settings = int8.info.metadata["quantization"]
        calibration = (f"{settings['calibration']} on {settings['calibration_rows']} {settings['calibration_split']} rows"
                       if "calibration" in settings else "per batch")
        table.append([str(int8.tag), f"{settings['method']} {settings.get('format', '')}".strip(),
                      f"{settings['weights']}, {'per channel' if settings['per_channel'] else 'per tensor'}",
                      calibration, ", ".join(settings.get("fp32_nodes", [])) or "none",
                      str(int8.info.metadata["quantized_nodes"])])
    return table


def _bars(by_precision: dict[str, bentoml.Model]) -> dict[str, list[float]]:
    """File KiB, batch-1 ms and batch-64 ms of the source and of each twin (NaN: no such twin)."""
    fp32 = by_precision["fp32"].info.metadata
    bars = {"source": [fp32["source_file_bytes"] / 1024, *_latencies(fp32, "source")]}
    for precision in ("fp32", "int8"):
        twin = by_precision.get(precision)
        bars[f"onnx {precision}"] = ([twin.info.metadata["file_bytes"] / 1024, *_latencies(twin.info.metadata, "twin")]
                                     if twin is not None else [float("nan")] * (1 + len(latency.BATCHES)))
    return bars


def _latencies(meta: dict[str, Any], side: str) -> list[float]:
    return [meta["latency_ms"][side][f"batch_{size}"] for size in latency.BATCHES]


def chart(found: dict[str, dict[str, bentoml.Model]], path: Path) -> None:
    """Size and latency on log scales (the models span three orders of magnitude), source vs twins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    bars = [_bars(by_precision) for by_precision in found.values()]
    positions = np.arange(len(found))
    titles = ["file size (KiB)", "latency, batch 1 (ms)", "latency, batch 64 (ms)"]
    figure, axes = plt.subplots(1, len(titles), figsize=(16, 4.8))
    for panel, (axis, title) in enumerate(zip(axes, titles)):
        for offset, kind in zip((-0.27, 0.0, 0.27), bars[0]):
            axis.bar(positions + offset, [b[kind][panel] for b in bars], 0.27, label=kind)
        axis.set_title(title)
        axis.set_yscale("log")
        axis.set_xticks(positions, list(found), rotation=30, ha="right", fontsize=8)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="upper center", ncol=len(bars[0]))
    figure.tight_layout(rect=(0, 0, 1, 0.93))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(out: Path, families: list[str] | None = None) -> str:
    """Write ``report.md`` and ``report.png`` into ``out``; return the text to print."""
    found = twins(families)
    if not found:
        return f"no ONNX twins in the model store {store.bentoml_home()}; run `python -m conversion` first"
    table = tables.markdown(HEADERS, rows(found))
    targets = tables.markdown(["twin", "target", "measured", "result", "why missed"], target_rows(found))
    methods = tables.markdown(["twin", "method", "weights", "activation ranges", "weighted layers kept FP32",
                               "integer nodes"], quantization_rows(found))
    out.mkdir(parents=True, exist_ok=True)
    chart(found, out / "report.png")
    text = (f"{table}\n\nHow the INT8 twins are quantized\n\n{methods}\n\n"
            f"Targets for the INT8 twins of the neural networks\n\n{targets}\n")
    (out / "report.md").write_text(
        "# ONNX twins\n\n"
        "Written by `python -m conversion report` from the model store. Every figure is the machine's that "
        "ran the conversion: INT8 kernels differ between CPUs (docs/conversion/int8.md). Parity is measured "
        "against the source model reloaded as its runtime loads it, on the held-out test split and on the "
        "whole data set (training and test rows); the gate requires both. Latency is the median of "
        "repeated calls, one thread per runtime (torch, TensorFlow through a traced `tf.function`, "
        "scikit-learn, onnxruntime CPU), source and twin measured in the same process during conversion; "
        "speed-up is source time / twin time. Size ratio is source file size / twin file size.\n\n"
        f"{table}\n\n## How the INT8 twins are quantized\n\n"
        "Why these settings, and what the others measured: [int8.md](int8.md).\n\n"
        f"{methods}\n\n## Targets for the INT8 twins of the neural networks\n\n{targets}\n\n"
        "![file size and latency, source against its ONNX twins](report.png)\n"
    )
    return text
