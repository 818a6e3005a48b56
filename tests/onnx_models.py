"""Small real ONNX models built by the tests themselves, for runtimes, batch queues and faults."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def lookup_model(logits: np.ndarray, features: int) -> onnx.ModelProto:
    """Class probabilities looked up by the first feature: row ``int(x[0])`` of ``logits``, softmaxed.

    A first feature outside ``logits``' rows makes onnxruntime fail the whole call (an out-of-range
    Gather): a real runtime failure, on chosen inputs only.
    """
    graph = helper.make_graph(
        [helper.make_node("Gather", ["input", "zero"], ["first"], axis=1),
         helper.make_node("Cast", ["first"], ["index"], to=TensorProto.INT64),
         helper.make_node("Gather", ["table", "index"], ["logits"], axis=0),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "lookup",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", logits.shape[1]])],
        [numpy_helper.from_array(logits.astype(np.float32), "table"),
         numpy_helper.from_array(np.array(0, np.int64), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model
