"""INT8 twins: static QDQ with weights that cannot saturate a CPU kernel; none where no kernel exists.

Every setting below was chosen by measuring whole-data-set agreement with the source on two CPUs (one
with AVX-512 VNNI, one emulated AVX2-only) for the digits CNNs and cancer MLPs, four trainings of each
version (docs/conversion/int8.md has the figures):

- Static, not dynamic: onnxruntime has no CPU kernel for ``ConvInteger``, so convolutions need QDQ
  anyway, and fixed activation ranges make a row's probabilities independent of the rows batched with it.
- 7-bit weights (``reduce_range``): on x86 without VNNI, onnxruntime multiplies uint8 activations by
  int8 weights with ``VPMADDUBSW``, which saturates each pair of products at int16. With weights in
  [-64, 64], 255 * 64 * 2 < 2**15, so every CPU computes the same integers. With 8-bit weights the
  digits v1 twin agreed on 100% of the data set on a VNNI CPU and on 99.28% on an AVX2 one.
- The last weighted layer (its output is the logits that pick the label) and a CNN's first convolution
  (raw pixels in, few weights) stay FP32: the two layers where rounding moved labels.
- Per-channel weight scales for convolutional nets (per-tensor moved digits labels); per-tensor for the
  dense ones, where per-channel measured the same agreement in files 8% larger.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from conversion.source import INPUT

STATIC_OPS = ["Conv", "Gemm", "MatMul", "Relu", "MaxPool"]
"""Quantizing Relu and MaxPool too keeps tensors in INT8 between kernels (2-3x faster at batch 64 than
quantizing Conv and Gemm alone, on the digits CNNs); Softmax stays float, so probabilities are not
rounded to steps of 1/256."""
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
FP32_FIRST_OP = "Conv"
"""The first node of this type stays FP32 (a CNN's first convolution)."""
CALIBRATION_BATCH = 64
NO_INTEGER_KERNEL = {
    "TreeEnsembleClassifier": "TreeEnsembleClassifier has no integer kernel in onnxruntime",
    "TreeEnsemble": "TreeEnsemble has no integer kernel in onnxruntime",
    "LinearClassifier": "LinearClassifier has no integer kernel in onnxruntime (not re-exported as MatMul)",
}


@dataclass(frozen=True)
class Quantized:
    onnx: bytes
    settings: dict[str, Any]


class _Rows(CalibrationDataReader):
    """Training rows in batches: the activation ranges a QDQ graph uses come from these."""

    def __init__(self, rows: np.ndarray):
        self._batches = iter(rows[i:i + CALIBRATION_BATCH] for i in range(0, len(rows), CALIBRATION_BATCH))

    def get_next(self) -> dict[str, np.ndarray] | None:
        rows = next(self._batches, None)
        return None if rows is None else {INPUT: rows}


def fp32_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the weighted nodes that stay FP32: the first convolution, if any, and the last layer."""
    weighted = [node for node in model.graph.node if node.op_type in WEIGHTED_OPS]
    first = [node for node in weighted if node.op_type == FP32_FIRST_OP][:1]
    kept = [node.name for node in [*first, *weighted[-1:]]]
    if not all(kept):
        raise ValueError(f"an unnamed node among the first convolution and the last layer: {kept}")
    return sorted(set(kept), key=kept.index)


def unavailable(model: onnx.ModelProto) -> str | None:
    """Why this graph has no INT8 form, or None when it has one."""
    ops = [node.op_type for node in model.graph.node]
    weighted = sum(op in WEIGHTED_OPS for op in ops)
    if weighted > len(fp32_nodes(model)):
        return None
    if weighted:
        return "every weighted layer is one that stays FP32 (the first convolution and the last layer)"
    reasons = [reason for op, reason in NO_INTEGER_KERNEL.items() if op in ops]
    return "; ".join(reasons) or f"no quantizable operator among {sorted(set(ops))}"


def quantize(fp32: bytes, x_train: np.ndarray) -> Quantized:
    """The INT8 graph of ``fp32``, its activation ranges calibrated on ``x_train``; deterministic."""
    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        folder = Path(tmp)
        (folder / "fp32.onnx").write_bytes(fp32)
        # shape inference and graph fusions first, as onnxruntime recommends before quantizing
        quant_pre_process(folder / "fp32.onnx", folder / "prepared.onnx")
        prepared = onnx.load(folder / "prepared.onnx")
        kept = fp32_nodes(prepared)
        per_channel = any(node.op_type == "Conv" for node in prepared.graph.node)
        settings = {"method": "static", "format": "QDQ", "per_channel": per_channel, "reduce_range": True,
                    "weights": "int8 in [-64, 64] (reduce_range: no int16 saturation on CPUs without VNNI)",
                    "activations": "uint8", "calibration": "minmax", "calibration_rows": len(x_train),
                    "calibration_split": "train", "op_types": STATIC_OPS, "fp32_nodes": kept}
        quantize_static(folder / "prepared.onnx", folder / "int8.onnx", _Rows(x_train),
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=STATIC_OPS, nodes_to_exclude=kept,
                        per_channel=settings["per_channel"], reduce_range=settings["reduce_range"],
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        return Quantized((folder / "int8.onnx").read_bytes(), settings)
