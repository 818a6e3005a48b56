"""torch: the stored ``torch.export`` program, called as its runtime calls it, exported by dynamo."""

from __future__ import annotations

import bentoml
import numpy as np
import onnx
import torch

from common import store
from conversion.source import INPUT, OPSET, PROBABILITIES, THREADS, Source


def load(model: bentoml.Model) -> Source:
    torch.set_num_threads(THREADS)
    program = torch.export.load(store.model_file(model))
    module = program.module()

    def predict(rows: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(rows)).numpy()

    def export() -> onnx.ModelProto:
        # The stored program already carries the normalisation and a dynamic batch dimension;
        # exporting it as is, rather than its module, avoids tracing the model a second time.
        sample = torch.zeros((2, *model.info.metadata["input_shape"]))
        onnx_program = torch.onnx.export(program, (sample,), dynamo=True, opset_version=OPSET,
                                         input_names=[INPUT], output_names=[PROBABILITIES],
                                         external_data=False, verbose=False)
        return onnx_program.model_proto

    return Source(model, predict, export, "torch.onnx.export(dynamo=True)", ("torch", "onnxscript"))
