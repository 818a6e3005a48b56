"""INT8 twins: static QDQ for convolutional nets, dynamic for dense ones, none where no kernel exists.

onnxruntime has no CPU kernel for ``ConvInteger``, so convolutions are never quantized dynamically:
they get QDQ pairs with activation ranges calibrated on the training split.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_dynamic, quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

from conversion.source import INPUT

STATIC_OPS = ["Conv", "Gemm", "MatMul", "Relu", "MaxPool"]
"""Quantizing Relu and MaxPool too keeps tensors in INT8 between kernels (2-3x faster at batch 64 than
quantizing Conv and Gemm alone, on the digits CNNs); Softmax stays float, so probabilities are not
rounded to steps of 1/256."""
DYNAMIC_OPS = ["MatMul", "Gemm"]
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


def unavailable(model: onnx.ModelProto) -> str | None:
    """Why this graph has no INT8 form, or None when it has one."""
    ops = {node.op_type for node in model.graph.node}
    if ops & {"Conv", "MatMul", "Gemm"}:
        return None
    reasons = [reason for op, reason in NO_INTEGER_KERNEL.items() if op in ops]
    return "; ".join(reasons) or f"no quantizable operator among {sorted(ops)}"


def quantize(fp32: bytes, x_train: np.ndarray) -> Quantized:
    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        folder = Path(tmp)
        (folder / "fp32.onnx").write_bytes(fp32)
        # shape inference and graph fusions first, as onnxruntime recommends before quantizing
        quant_pre_process(folder / "fp32.onnx", folder / "prepared.onnx")
        has_conv = any(node.op_type == "Conv" for node in onnx.load_from_string(fp32).graph.node)
        settings = _static(folder, x_train) if has_conv else _dynamic(folder)
        return Quantized((folder / "int8.onnx").read_bytes(), settings)


def _static(folder: Path, x_train: np.ndarray) -> dict[str, Any]:
    settings = {"method": "static", "format": "QDQ", "per_channel": True, "reduce_range": False,
                "weights": "int8", "activations": "uint8", "calibration": "minmax",
                "calibration_rows": int(len(x_train)), "calibration_split": "train", "op_types": STATIC_OPS}
    quantize_static(folder / "prepared.onnx", folder / "int8.onnx", _Rows(x_train),
                    quant_format=QuantFormat.QDQ, op_types_to_quantize=STATIC_OPS,
                    per_channel=settings["per_channel"], reduce_range=settings["reduce_range"],
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return settings


def _dynamic(folder: Path) -> dict[str, Any]:
    settings = {"method": "dynamic", "per_channel": False, "reduce_range": False, "weights": "int8",
                "activations": "uint8 (range computed per batch)", "op_types": DYNAMIC_OPS}
    quantize_dynamic(folder / "prepared.onnx", folder / "int8.onnx", op_types_to_quantize=DYNAMIC_OPS,
                     per_channel=settings["per_channel"], reduce_range=settings["reduce_range"],
                     weight_type=QuantType.QInt8)
    return settings
