"""TensorFlow/Keras 3: the ``.keras`` file behind one ``tf.function``, which tf2onnx also converts.

``tf2onnx.convert.from_keras`` fails on Keras 3 models; ``from_function`` on a traced function works.
"""

from __future__ import annotations

from common.tf_env import keras, tf  # isort: skip  (first: tf2onnx imports TensorFlow)

import bentoml  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import tf2onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from common import store  # noqa: E402
from conversion.source import INPUT, OPSET, PROBABILITIES, THREADS, Source

tf.config.threading.set_intra_op_parallelism_threads(THREADS)
tf.config.threading.set_inter_op_parallelism_threads(THREADS)


def load(model: bentoml.Model) -> Source:
    keras_model = keras.saving.load_model(store.model_file(model), safe_mode=True, compile=False)
    spec = tf.TensorSpec([None, *model.info.metadata["input_shape"]], tf.float32, name=INPUT)

    @tf.function(input_signature=[spec])
    def call(rows):
        # a dict output names the ONNX output after its key
        return {PROBABILITIES: keras_model(rows, training=False)}

    def predict(rows: np.ndarray) -> np.ndarray:
        return call(rows)[PROBABILITIES].numpy()

    def export() -> onnx.ModelProto:
        onnx_model, _ = tf2onnx.convert.from_function(call, input_signature=[spec], opset=OPSET)
        return _fold_captured_constants(onnx_model, call.get_concrete_function())

    return Source(model, predict, export, "tf2onnx.convert.from_function", ("tensorflow-cpu", "keras", "tf2onnx"))


def _fold_captured_constants(onnx_model: onnx.ModelProto, concrete) -> onnx.ModelProto:
    """Keras 3 keeps adapted Normalization statistics as eager tensors, not variables, and tf2onnx
    turns such captures into graph inputs; they are constants of the model, so they become initializers."""
    captured = concrete.inputs[len(concrete.inputs) - len(concrete.captured_inputs):]
    values = {t.name: v.numpy() for t, v in zip(captured, concrete.captured_inputs) if v.dtype != tf.resource}
    graph = onnx_model.graph
    for graph_input in list(graph.input):
        if graph_input.name in values:
            graph.input.remove(graph_input)
            graph.initializer.append(numpy_helper.from_array(values[graph_input.name], graph_input.name))
    return onnx_model
