"""TensorFlow/Keras 3: the ``.keras`` file in safe mode, called through one compiled ``tf.function``.

``model.predict`` builds a tf.data pipeline per call (milliseconds); a traced function does not.
"""

from __future__ import annotations

import numpy as np

from common.tf_env import keras, tf
from runtimes.base import Runtime


class TensorFlowRuntime(Runtime):
    runtime = "tensorflow"

    def load(self) -> None:
        _set_threads(self.threads)
        model = keras.saving.load_model(self.path, safe_mode=True, compile=False)
        spec = tf.TensorSpec([None, *self.schema.input_shape], tf.float32)
        self._call = tf.function(lambda x: model(x, training=False), input_signature=[spec])
        self._call(np.zeros((1, *self.schema.input_shape), np.float32))  # trace now, not on a request

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self._call(batch).numpy()


def _set_threads(threads: int) -> None:
    """TF fixes its pools at first use; a second model in the same process finds them set."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass


RUNTIME = TensorFlowRuntime
