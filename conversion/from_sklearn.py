"""scikit-learn: the skops Pipeline, trusting only scikit-learn and NumPy types, converted by skl2onnx."""

from __future__ import annotations

import bentoml
import numpy as np
import onnx
import skops.io
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from common import store
from conversion.source import INPUT, OPSET, THREADS, Source

TRUSTED_PREFIXES = ("sklearn.", "numpy.")
ML_OPSET = 3


def load(model: bentoml.Model) -> Source:
    path = store.model_file(model)
    untrusted = skops.io.get_untrusted_types(file=path)
    refused = [t for t in untrusted if not t.startswith(TRUSTED_PREFIXES)]
    if refused:
        raise ValueError(f"{model.tag}: refusing to load types outside scikit-learn/NumPy: {refused}")
    pipeline = skops.io.load(path, trusted=untrusted)
    if hasattr(pipeline[-1], "n_jobs"):
        pipeline[-1].n_jobs = THREADS
    threadpool_limits(THREADS)

    def predict(rows: np.ndarray) -> np.ndarray:
        return pipeline.predict_proba(rows).astype(np.float32, copy=False)

    def export() -> onnx.ModelProto:
        return convert_sklearn(
            pipeline,
            initial_types=[(INPUT, FloatTensorType([None, *model.info.metadata["input_shape"]]))],
            target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET},
            options={
                # sklearn subtracts and divides in float32; the default Scaler op multiplies by
                # 1/scale, which moves rows across the forest's split thresholds (|dp| up to 0.02)
                StandardScaler: {"div": "div"},
                type(pipeline[-1]): {"zipmap": False},
            },
        )

    return Source(model, predict, export, "skl2onnx.convert_sklearn", ("scikit-learn", "skl2onnx"))
