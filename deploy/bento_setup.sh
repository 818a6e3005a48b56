#!/bin/sh
# The pins installed without their declared dependencies, by `make setup` (into .venv) and by
# `bentoml containerize` (bentofile.yaml docker.setup_script, after requirements.txt). Their declared
# dependencies would bring a second TensorFlow or an older protobuf; what they really need is pinned in
# requirements.txt:
# - tensorflow-serving-api (TF Serving's gRPC stubs) needs tensorflow's modules (tensorflow_cpu provides
#   them), grpcio and protobuf;
# - tritonclient (OIP's gRPC stubs and client) needs grpcio, protobuf, numpy, packaging, python-rapidjson
#   and urllib3; it declares protobuf<7 and ml-dtypes<=0.5.4, below TensorFlow's pins, and runs on
#   protobuf 7 and ml_dtypes 0.6 (tests/e2e/test_grpc.py).
set -eu
uv pip install --quiet --no-deps tensorflow-serving-api==2.21.0 tritonclient==2.73.0
