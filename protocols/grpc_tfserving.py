"""TensorFlow Serving's ``PredictionService`` over gRPC: Predict and GetModelMetadata.

The stubs are ``tensorflow_serving.apis`` (tensorflow-serving-api, installed without its dependency on
the full ``tensorflow`` package: ``tensorflow_cpu`` provides the same modules), and tensors are read
and written with TensorFlow's own ``make_ndarray``/``make_tensor_proto``.

The meaning is TF Serving REST's (``protocols/tfserving.py``): a logical model is a TF Serving model,
its variants are its versions (``model_spec.version_label`` names one, ``model_spec.version`` pins the
variant whose model tag has that number) and without a version the A/B split decides, sticky by the
``user-id`` metadata. The request has one input, whatever its name, holding rows. Signatures:
``serving_default`` answers ``probabilities``; ``predict`` answers ``probabilities`` and ``label``. Every
answer has one more output, ``prediction_ids`` (DT_STRING, one per row: the ids ``POST /feedback``
takes), and names the variant that answered as ``model_spec.version_label``. Classify, Regress and
MultiInference (``tf.Example`` inputs) are not served: UNIMPLEMENTED.
"""

from __future__ import annotations

from typing import Any

import common.tf_env  # noqa: F401  (before TensorFlow: triton must be loaded first)
import grpc
import numpy as np
from tensorflow.core.framework import tensor_shape_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from common.errors import RequestError
from common.tf_env import tf
from protocols.grpc_h2 import Registry
from protocols.grpc_guard import Guard, rpc, user_id
from protocols.rest import pinned_variant
from serving import types
from serving.dataplane import DataPlane

ENDPOINT = "grpc_tfserving"
"""The data plane's name for these requests in metrics, the prediction log and the report."""
INPUT = "input"
PREDICTION_IDS = "prediction_ids"
SIGNATURES = {"serving_default": ("probabilities",), "predict": ("probabilities", "label")}
DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"
SIGNATURE_DEF = "signature_def"
"""The one metadata field TF Serving serves, and so do we."""


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    SERVICE = prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name

    def __init__(self, dataplane: DataPlane, guard: Guard):
        self.dataplane = dataplane
        self.guard = guard

    def register(self, registry: Registry) -> None:
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(self, registry)

    @rpc(inference=True)
    async def Predict(self, request: predict_pb2.PredictRequest, context: Any) -> predict_pb2.PredictResponse:
        spec = request.model_spec
        variant = pinned_variant(self.dataplane.router, spec.name, _version(spec))
        signature = _signature(spec.signature_name)
        wanted = list(request.output_filter) or [*SIGNATURES[signature], PREDICTION_IDS]
        for i, name in enumerate(wanted):
            if name not in (*SIGNATURES[signature], PREDICTION_IDS):
                raise RequestError(f"output_filter.{i}", f"{name!r} is not an output of {signature!r}",
                                   ", ".join((*SIGNATURES[signature], PREDICTION_IDS)))
        if len(request.inputs) != 1:
            raise RequestError("inputs", f"{len(request.inputs)} named inputs",
                               "one input, whatever its name: these models take one tensor")
        [(name, proto)] = request.inputs.items()
        field = f"inputs.{name}"
        try:
            tensor = tf.make_ndarray(proto)
        except (TypeError, ValueError) as err:
            raise RequestError(field, f"not a tensor of numbers: {err}", "a DT_FLOAT TensorProto") from None
        rows = self.dataplane.rows(spec.name, tensor, field, batched=True)
        [answer] = await self.dataplane.infer(
            ENDPOINT, [types.InferenceRequest(spec.name, rows, user_id(context), variant)])
        values = {"probabilities": np.asarray(answer.probabilities, dtype=np.float32),
                  "label": np.asarray(answer.labels, dtype=object),
                  PREDICTION_IDS: np.asarray(answer.prediction_ids, dtype=object)}
        response = predict_pb2.PredictResponse()
        response.model_spec.name = answer.model
        response.model_spec.version_label = answer.variant
        response.model_spec.signature_name = signature
        for output in wanted:
            response.outputs[output].CopyFrom(tf.make_tensor_proto(values[output]))
        return response

    @rpc()
    async def GetModelMetadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest,
                               context: Any) -> get_model_metadata_pb2.GetModelMetadataResponse:
        """The signatures (``signature_def``, the one field TF Serving serves): one input of rows,
        the outputs of each signature."""
        spec = request.model_spec
        variant = pinned_variant(self.dataplane.router, spec.name, _version(spec))
        for i, field in enumerate(request.metadata_field):
            if field != SIGNATURE_DEF:
                raise RequestError(f"metadata_field.{i}", f"{field!r} is not served", SIGNATURE_DEF)
        schema = self.dataplane.schema(spec.name)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        shapes = {"probabilities": (types_pb2.DT_FLOAT, [-1, len(schema.classes)]),
                  "label": (types_pb2.DT_STRING, [-1]), PREDICTION_IDS: (types_pb2.DT_STRING, [-1])}
        for name, outputs in SIGNATURES.items():
            signature = signatures.signature_def[name]
            signature.method_name = PREDICT_METHOD
            signature.inputs[INPUT].CopyFrom(_info(INPUT, types_pb2.DT_FLOAT, [-1, *schema.input_shape]))
            for output in (*outputs, PREDICTION_IDS):
                signature.outputs[output].CopyFrom(_info(output, *shapes[output]))
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = spec.name
        if variant is not None:
            response.model_spec.version_label = variant
        response.metadata[SIGNATURE_DEF].Pack(signatures)
        return response


def _version(spec: Any) -> str | None:
    """The version a model spec pins: its label (a variant name), its number, or None."""
    choice = spec.WhichOneof("version_choice")
    if choice == "version_label":
        return spec.version_label
    return str(spec.version.value) if choice == "version" else None


def _signature(name: str) -> str:
    signature = name or DEFAULT_SIGNATURE
    if signature not in SIGNATURES:
        raise RequestError("model_spec.signature_name", f"unknown signature {signature!r}", " or ".join(SIGNATURES))
    return signature


def _info(name: str, dtype: int, shape: list[int]) -> meta_graph_pb2.TensorInfo:
    return meta_graph_pb2.TensorInfo(name=name, dtype=dtype, tensor_shape=tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=size) for size in shape]))
