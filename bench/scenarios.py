"""The scenarios: which server configuration, which path (an HTTP route or a gRPC method) and body, what load."""

from __future__ import annotations

import copy
import os
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image
from tritonclient.grpc import service_pb2 as oip_pb2
from urllib3 import encode_multipart_formdata

from bench import peer_servers
from bench.loadgen import Body, grpc_message
from common import config, datasets
from common.logs import get_logger
from harness.server import ServerProcess, isolated_home

ROOT = Path(__file__).resolve().parent.parent
log = get_logger("bench")

SERVERS: dict[str, tuple[str, dict[str, Any]]] = {
    "bare": ("bench.bare_service:Bare", {}),
    "bundle": ("service:Bundle", {}),
    "bundle-no-batching": ("service:Bundle", {"batching": {"enabled": False}}),
    "bundle-tracing": ("service:Bundle", {"service": {"tracing": True}}),
    "bundle-1-worker": ("service:Bundle", {"service": {"workers": 1}}),
    "bare-1-worker": ("bench.bare_service:Bare", {"service": {"workers": 1}}),
    "bundle-cache": ("service:Bundle", {"cache": {"backend": "memory", "max_rows": 10_000}}),
    "bundle-bentoml-path": ("service:Bundle", {"service": {"direct_path": False}}),
    "bundle-connections-kept": ("service:Bundle", {"service": {"max_connection_age_s": None}}),
    "bundle-no-fork": ("service:Bundle", {"service": {"fork_workers": False}}),
    "bundle-unpinned": ("service:Bundle", {"service": {"pin_workers": False}}),
}
GRPC = "grpc:"
"""A scenario path with this prefix is a gRPC method, called on the server's gRPC port by h2load."""
GRPC_ENDPOINTS = {"/inference.GRPCInferenceService/ModelInfer": "grpc_oip"}
"""The data plane's endpoint name of each gRPC method called: its answered rows are a run's OK count."""
CACHE_ROWS = 10_000
"""Distinct wine rows of the cached scenarios: as many as each worker's LRU keeps."""
CACHE_DRAWS = 100_000
"""Bodies sent in turn (more than a full run sends): Zipf draws over ``CACHE_ROWS`` rows, or distinct rows
(far more than one worker's LRU keeps, so they always miss)."""
ZIPF_EXPONENT = 1.0
LOG_PAIR = "prediction log on/off interleaved"
"""The step that measures the prediction log's cost (selected by ``--scenarios`` like a scenario): two
fresh servers, log on and log off, under ``/predict`` wine at the main concurrency, run after run in
turn (``bench.interleaved``). Scenarios of one server each run minutes apart, and the machine's speed
drifts more than the 5% being measured between them."""
SPIKE = "load spike"
"""The step that sends the performance issue's spike (``bench.spike``) to a fresh server: selected by
``--scenarios`` like a scenario."""
LOG_CONFIGURATIONS = {"log off": {"store": {"log_predictions": False}}, "log on": {}}
"""The reference first."""


@dataclass(frozen=True)
class Scenario:
    name: str
    server: str
    path: str
    body: str
    concurrency: int | None = None
    rate: float | None = None


def server_config(overrides: dict[str, Any], destination: Path) -> Path:
    """config.yaml with ``overrides`` merged in, validated like the service will."""
    merged = copy.deepcopy(yaml.safe_load(config.config_path().read_text()))
    for section, values in overrides.items():
        merged.setdefault(section, {}).update(values)
    destination.write_text(yaml.safe_dump(merged))
    config.load(destination)
    return destination


def start_server(target: str, overrides: dict[str, Any], store: Path, folder: Path) -> ServerProcess:
    """``target`` served from ``folder`` with config.yaml plus ``overrides``, on its own home linking the
    models of ``store``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENTOML_HOME": str(isolated_home(store, folder)),
           "BUNDLE_CONFIG": str(server_config(overrides, folder / "config.yaml"))}
    return ServerProcess(target, ROOT, env, folder)


def _json(payload: dict[str, Any]) -> Body:
    return Body(json.dumps(payload).encode(), "application/json")


def bodies(peers: list[str] = ()) -> dict[str, Body]:
    rows = {family: datasets.load(family).x_test[0].tolist() for family in datasets.FAMILIES}
    digit = datasets.load("digits").x_test[0]
    png = io.BytesIO()
    Image.fromarray((255 - digit / 16 * 255).astype(np.uint8)).resize((64, 64)).save(png, format="PNG")
    multipart, content_type = encode_multipart_formdata({"image": ("digit.png", png.getvalue(), "image/png")})
    out = {f"predict-{f}": _json({"instances": [{"model": f, "inputs": rows[f]}]}) for f in rows}
    out["ndarray-wine"] = _json({"model": "wine", "inputs": [rows["wine"]]})
    out["oip-wine"] = _json({"inputs": [{"name": "input", "shape": [1, len(rows["wine"])], "datatype": "FP32",
                                         "data": rows["wine"]}]})
    out["tfserving-wine"] = _json({"instances": [rows["wine"]]})
    infer = oip_pb2.ModelInferRequest(model_name="wine")
    wine = np.asarray([rows["wine"]], dtype=np.float32)
    infer.inputs.add(name="input", datatype="FP32", shape=wine.shape)
    infer.raw_input_contents.append(wine.tobytes())  # binary, as tritonclient sends it
    out["grpc-oip-wine"] = Body(grpc_message(infer.SerializeToString()), "application/grpc")
    out["image-digits"] = Body(multipart, content_type)
    out.update(cache_bodies(datasets.load("wine").x_test))
    out.update({f"peer-{name}": Body(peer_servers.body(name), "application/json") for name in peers})
    return out


def cache_bodies(rows: np.ndarray) -> dict[str, Body]:
    """``/predict`` wine bodies, one a line, for the prediction cache: Zipf-distributed repeats of
    ``CACHE_ROWS`` distinct rows (test rows, each a little shifted), and rows that never repeat."""
    rng = np.random.default_rng(18)

    def distinct(count: int) -> np.ndarray:
        base = rows[np.arange(count) % len(rows)]
        return (base * (1 + rng.uniform(-0.05, 0.05, base.shape))).astype(np.float32)

    def lines(table: np.ndarray) -> Body:
        return Body(b"\n".join(json.dumps({"instances": [{"model": "wine", "inputs": row}]}).encode()
                               for row in table.tolist()), "application/json", many=True)

    ranks = np.arange(1, CACHE_ROWS + 1, dtype=np.float64) ** -ZIPF_EXPONENT
    draws = rng.choice(CACHE_ROWS, size=CACHE_DRAWS, p=ranks / ranks.sum())
    return {"predict-wine-zipf": lines(distinct(CACHE_ROWS)[draws]),
            "predict-wine-distinct": lines(distinct(CACHE_DRAWS))}


def peer_scenarios(peers: list[str], smoke: bool) -> list[Scenario]:
    """Each peer under the loads of ``/predict`` wine: the open loop and the main concurrency."""
    rate, main = (50.0 if smoke else 300.0), main_concurrency(smoke)
    return [scenario for name in peers for scenario in (
        Scenario(f"{name} wine open {rate:g}/s", name, peer_servers.PEERS[name].path, f"peer-{name}", rate=rate),
        Scenario(f"{name} wine c={main}", name, peer_servers.PEERS[name].path, f"peer-{name}", concurrency=main))]


def sweep(smoke: bool) -> tuple[int, ...]:
    """The closed loop's connection counts."""
    return (1, 8) if smoke else (1, 4, 8, 16, 32, 64)


def main_concurrency(smoke: bool) -> int:
    """The connections of every scenario beside the sweep: 32 in the full run."""
    return sweep(smoke)[-1 if smoke else -2]


def plan(smoke: bool) -> list[Scenario]:
    rate = 50.0 if smoke else 300.0
    main = main_concurrency(smoke)
    # Order within a server: the open loop and the sweep first, digits (which also feeds the
    # configured shadow variant) last, so no run inherits another's background work.
    grpc = [Scenario(f"gRPC OIP infer wine c={main}", "bundle", f"{GRPC}/inference.GRPCInferenceService/ModelInfer",
                     "grpc-oip-wine", concurrency=main)] if shutil.which("h2load") else []
    if not grpc:
        log.warning("h2load is not installed (make tools installs it): the gRPC scenario is left out")
    scenarios = [Scenario(f"bare open {rate:g}/s", "bare", "/predict", "predict-wine", rate=rate)]
    scenarios += [Scenario(f"bare c={c}", "bare", "/predict", "predict-wine", concurrency=c) for c in sweep(smoke)]
    scenarios += [Scenario(f"predict wine open {rate:g}/s", "bundle", "/predict", "predict-wine", rate=rate)]
    scenarios += [Scenario(f"predict wine c={c}", "bundle", "/predict", "predict-wine", concurrency=c)
                  for c in sweep(smoke)]
    scenarios += [
        Scenario(f"predict wine cache off zipf c={main}", "bundle", "/predict", "predict-wine-zipf",
                 concurrency=main),
        Scenario(f"predict cancer c={main}", "bundle", "/predict", "predict-cancer", concurrency=main),
        Scenario(f"predict_ndarray wine c={main}", "bundle", "/predict_ndarray", "ndarray-wine",
                 concurrency=main),
        Scenario(f"OIP infer wine c={main}", "bundle", "/v2/models/wine/infer", "oip-wine", concurrency=main),
        Scenario(f"TF Serving predict wine c={main}", "bundle", "/v1/models/wine:predict", "tfserving-wine",
                 concurrency=main),
        *grpc,
        Scenario(f"predict digits c={main}", "bundle", "/predict", "predict-digits", concurrency=main),
        Scenario(f"classify_image c={main}", "bundle", "/classify_image", "image-digits", concurrency=main),
    ]
    if not smoke:
        scenarios += [
            Scenario(f"predict wine no batching c={main}", "bundle-no-batching", "/predict", "predict-wine",
                     concurrency=main),
            Scenario(f"predict wine tracing on c={main}", "bundle-tracing", "/predict", "predict-wine",
                     concurrency=main),
            Scenario(f"predict wine 1 worker c={main}", "bundle-1-worker", "/predict", "predict-wine",
                     concurrency=main),
            Scenario(f"predict wine connections kept c={main}", "bundle-connections-kept", "/predict",
                     "predict-wine", concurrency=main),
            Scenario(f"predict wine no fork c={main}", "bundle-no-fork", "/predict", "predict-wine", concurrency=main),
            Scenario(f"predict wine unpinned c={main}", "bundle-unpinned", "/predict", "predict-wine",
                     concurrency=main),
            Scenario(f"bare 1 worker c={main}", "bare-1-worker", "/predict", "predict-wine", concurrency=main),
        ]
    if not smoke:  # BentoML's path (issue 18: the direct path off), beside the default direct path above
        scenarios += [Scenario(f"bentoml path {name} c={main}", "bundle-bentoml-path", path, load, concurrency=main)
                      for name, path, load in (("predict wine", "/predict", "predict-wine"),
                                               ("OIP infer wine", "/v2/models/wine/infer", "oip-wine"),
                                               ("TF Serving predict wine", "/v1/models/wine:predict",
                                                "tfserving-wine"))]
    scenarios += [  # the prediction cache (issue 18), beside "predict wine cache off zipf" uncached
        Scenario(f"predict wine cache zipf c={main}", "bundle-cache", "/predict", "predict-wine-zipf",
                 concurrency=main),
        Scenario(f"predict wine cache miss c={main}", "bundle-cache", "/predict", "predict-wine-distinct",
                 concurrency=main),
    ]
    return scenarios
