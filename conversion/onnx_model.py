"""ONNX files as conversion writes and runs them: one contract for every twin, one session setup."""

from __future__ import annotations

from pathlib import Path
from collections.abc import Iterable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from conversion.source import INPUT, PROBABILITIES, THREADS

INTEGER_OPS = frozenset({"MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul", "QGemm",
                         "DynamicQuantizeMatMul"})
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
GRAPH_NAME = "twin"
"""Every twin's graph has this fixed name (the exporters' names vary from run to run)."""


def finish(model: onnx.ModelProto, input_shape: list[int], n_classes: int) -> bytes:
    """Drop what inference does not need, check the runtime contract, and serialise to one file.

    The torch exporter records a Python stack trace (with local paths) on every node, a tenth of the
    file; the quantizer declares every domain onnxruntime knows; neither is read by a runtime. The graph's
    name and doc string go too: skl2onnx names it with a random UUID and tf2onnx with a per-process
    trace counter, and opsets are listed by domain (skl2onnx lists them in set order, which changes with
    each process's hash seed), so the same model converted twice gives the same bytes.
    """
    graph = model.graph
    graph.name, graph.doc_string = GRAPH_NAME, ""
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    domains = {node.domain for node in graph.node} | {""}
    versions = {entry.domain: entry.version for entry in model.opset_import if entry.domain in domains}
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(domain, v) for domain, v in sorted(versions.items()))
    onnx.checker.check_model(model, full_check=True)
    _check_tensor(graph.input, INPUT, [*input_shape])
    _check_tensor(graph.output, PROBABILITIES, [n_classes])
    return model.SerializeToString()


def _check_tensor(tensors: Iterable[onnx.ValueInfoProto], name: str, fixed_dims: list[int]) -> None:
    """float32, a dynamic first (batch) dimension, then exactly ``fixed_dims``."""
    found = {t.name: t for t in tensors}
    if name not in found:
        raise ValueError(f"ONNX graph has no tensor {name!r} among {sorted(found)}")
    tensor_type = found[name].type.tensor_type
    dims = tensor_type.shape.dim
    shape_ok = (len(dims) == len(fixed_dims) + 1 and not dims[0].HasField("dim_value")
                and [d.dim_value for d in dims[1:]] == fixed_dims)
    if tensor_type.elem_type != onnx.TensorProto.FLOAT or not shape_ok:
        raise ValueError(f"ONNX tensor {name!r} is not float32 of shape (N, {fixed_dims}): {found[name].type}")


def opsets(model: onnx.ModelProto) -> dict[str, int]:
    """Opset version per domain, the default domain under its name ``ai.onnx``."""
    return {entry.domain or "ai.onnx": int(entry.version) for entry in model.opset_import}


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers: what quantization shrinks, as opposed to the graph around them."""
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def quantized_nodes(model: onnx.ModelProto) -> int:
    """Nodes that run on integers: integer kernels, and in QDQ format the nodes between a
    DequantizeLinear and a QuantizeLinear, which onnxruntime fuses into QLinear kernels."""
    nodes = model.graph.node
    dequantized = {out for node in nodes if node.op_type == "DequantizeLinear" for out in node.output}
    requantized = {node.input[0] for node in nodes if node.op_type == "QuantizeLinear"}
    return sum(
        node.op_type in INTEGER_OPS
        or (node.op_type not in QDQ_OPS and bool(dequantized.intersection(node.input))
            and bool(requantized.intersection(node.output)))
        for node in nodes
    )


def session(model: bytes | Path) -> ort.InferenceSession:
    """The CPU session every measurement uses: one thread, no spinning, all graph optimisations."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=["CPUExecutionProvider"])


def probabilities(session: ort.InferenceSession, rows: np.ndarray) -> np.ndarray:
    return session.run([PROBABILITIES], {INPUT: rows})[0]
