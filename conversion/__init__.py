"""ONNX twins of the stored models: FP32 for every model, INT8 where onnxruntime has integer kernels.

``python -m conversion`` converts what has no twin yet; ``python -m conversion report`` summarises.
"""
