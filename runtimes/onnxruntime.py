"""onnxruntime: every ONNX twin, FP32 or INT8, on the CPU execution provider."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from runtimes.base import Runtime


class OnnxRuntime(Runtime):
    runtime = "onnxruntime"

    def load(self) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning threads burn a core while idle, and this process shares its cores with others.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self._input = str(self.metadata["onnx_input"])
        self._output = str(self.metadata["onnx_probabilities_output"])

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run([self._output], {self._input: batch})[0]


RUNTIME = OnnxRuntime
