"""Per-variant Prometheus series, and their sum over every worker for the live experiment views.

The series are BentoML metrics (prometheus_client in multiprocess mode under ``bentoml serve``), so
``/metrics`` shows them for every worker, and :func:`collect` reads the same files any worker wrote.
``epoch`` identifies the weights in force, so the traffic share is compared with the weights that
produced it, not with weights from before a ramp.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable

import bentoml
from prometheus_client import CollectorRegistry, Metric
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""Where BentoML's workers keep their metric files (prometheus_client's multiprocess mode)."""

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

REQUESTS = bentoml.metrics.Counter(
    name="bundle_requests",
    documentation="Rows answered, by model, variant, endpoint and outcome",
    labelnames=["model", "variant", "endpoint", "outcome", "pinned", "epoch"],
)
LATENCY = bentoml.metrics.Histogram(
    name="bundle_inference_seconds",
    documentation="Duration of one runtime call (one call serves one batch)",
    labelnames=["model_tag"],
    buckets=LATENCY_BUCKETS,
)
BATCH_ROWS = bentoml.metrics.Histogram(
    name="bundle_batch_rows",
    documentation="Rows per runtime call",
    labelnames=["model_tag"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
LABELS = bentoml.metrics.Counter(
    name="bundle_predicted_labels",
    documentation="Predicted labels by model and variant",
    labelnames=["model", "variant", "label"],
)
DISCONNECTS = bentoml.metrics.Counter(
    name="bundle_client_disconnects",
    documentation="Requests whose client hung up before the answer was sent, by route (a fixed path, "
                  "a protocol's prefix such as /v2/models/*, or other)",
    labelnames=["path"],
)
SHADOW = bentoml.metrics.Counter(
    name="bundle_shadow",
    documentation="Shadow answers compared with the live answer: agree, disagree, error, dropped",
    labelnames=["model", "variant", "outcome"],
)
LOG_DROPPED = bentoml.metrics.Counter(
    name="bundle_log_dropped",
    documentation="Prediction log rows never written: queue_full (the store is slower than traffic), "
                  "store_error (a write failed)",
    labelnames=["reason"],
)
STORE_UP = bentoml.metrics.Gauge(
    name="bundle_store_up",
    documentation="1 when this worker's last call to the experiment store worked, 0 when the store could not be "
                  "reached (the alert rules watch it)",
    multiprocess_mode="mostrecent",
)
API_REQUESTS = bentoml.metrics.Counter(
    name="bundle_api_requests",
    documentation="Inference requests checked by the front door when keys or rate limits are on, by API key "
                  "name (anonymous without keys, none for a missing or unknown key) and outcome: admitted, "
                  "rate_limited, unauthorized",
    labelnames=["key", "outcome"],
)
CACHE = bentoml.metrics.Counter(
    name="bundle_cache",
    documentation="Rows looked up in the prediction cache (cache.backend), by model tag and outcome: hit "
                  "(answered from the cache), miss (sent to the runtime), error (a lookup failed: sent to the "
                  "runtime; or storing the runtime's answers failed)",
    labelnames=["model_tag", "outcome"],
)


OUTCOME_GAUGES = dict(labelnames=["model", "variant"], multiprocess_mode="mostrecent")
"""Outcome metrics are computed from the shared store, so any worker's latest value is everyone's."""
OUTCOME_LABELLED = bentoml.metrics.Gauge(
    name="bundle_outcome_labelled", documentation="Labelled predictions per variant (POST /feedback)",
    **OUTCOME_GAUGES)
OUTCOME_ACCURACY = bentoml.metrics.Gauge(
    name="bundle_outcome_accuracy", documentation="Accuracy per variant on labelled predictions",
    **OUTCOME_GAUGES)
OUTCOME_LOG_LOSS = bentoml.metrics.Gauge(
    name="bundle_outcome_log_loss", documentation="Log loss (nats) per variant on labelled predictions",
    **OUTCOME_GAUGES)
OUTCOME_BRIER = bentoml.metrics.Gauge(
    name="bundle_outcome_brier", documentation="Multi-class Brier score per variant on labelled predictions",
    **OUTCOME_GAUGES)
OUTCOME_REWARD = bentoml.metrics.Gauge(
    name="bundle_outcome_reward", documentation="Mean reward per variant (POST /feedback rewards)",
    **OUTCOME_GAUGES)

DRIFT_GAUGES = dict(labelnames=["model", "variant", "feature"], multiprocess_mode="mostrecent")
"""Drift checks run in one worker (a lease) and are stored: its latest value is everyone's."""
DRIFT_PSI = bentoml.metrics.Gauge(
    name="bundle_drift_psi", documentation="Population stability index of a feature's live sample against "
    "the model's reference (feature __predictions__ and __confidence__: the answers)", **DRIFT_GAUGES)
DRIFT_P_VALUE = bentoml.metrics.Gauge(
    name="bundle_drift_p_value", documentation="A feature's drift test p-value (KS, chi-square for the "
    "predicted classes), adjusted across the variant's features", **DRIFT_GAUGES)
DRIFT_DETECTED = bentoml.metrics.Gauge(
    name="bundle_drift_detected", documentation="1 while a feature's last check found drift", **DRIFT_GAUGES)
DRIFT_CHECKED = bentoml.metrics.Gauge(
    name="bundle_drift_checked_timestamp_seconds", documentation="When a variant's drift was last checked",
    labelnames=["model", "variant"], multiprocess_mode="mostrecent")

EXPERIMENT_VERSION = bentoml.metrics.Gauge(
    name="bundle_experiment_version", documentation="Store version of each experiment in force, the oldest among "
    "this replica's live workers: a change is in force in every worker of the replica once this reaches the version "
    "its PUT answered (0: config.yaml's, the store not reached yet)", labelnames=["model"],
    multiprocess_mode="livemin")
"""livemin: each worker polls the store on its own, so the replica has applied a change only when its slowest
worker has; a dead worker's value is dropped (``serving.prefork`` marks it dead)."""
WEIGHT_CHANGES = bentoml.metrics.Counter(
    name="bundle_weight_changes", documentation="Changes of an experiment's weights by source: admin, promote, "
    "rollback (the alert rules watch rollbacks)", labelnames=["model", "source"])
ROLLBACKS = bentoml.metrics.Counter(
    name="bundle_rollbacks", documentation="Candidates rolled back by the progressive rollout controller (a "
    "rollback verdict or a breached guardrail; its weight changes have source rollout). An admin's rollbacks "
    "are bundle_weight_changes_total{source=\"rollback\"}; the alert rules watch both", labelnames=["model"])
SRM_P_VALUE = bentoml.metrics.Gauge(
    name="bundle_srm_p_value", documentation="Sample-ratio-mismatch p-value of the split in force, from the "
    "last decision (GET /experiments/{model}/decision)", labelnames=["model"], multiprocess_mode="mostrecent")


def collect() -> list[Metric]:
    """Every worker's samples, summed, as prometheus_client metric families."""
    registry = CollectorRegistry()
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        MultiProcessCollector(registry, path=directory)
        return list(registry.collect())
    from prometheus_client import REGISTRY

    return list(REGISTRY.collect())


def counter_totals(metrics: Iterable[Metric], name: str, keys: tuple[str, ...],
                   **match: str) -> dict[tuple[str, ...], float]:
    """Totals of counter ``name`` grouped by the ``keys`` labels, over samples matching ``match``."""
    totals: dict[tuple[str, ...], float] = defaultdict(float)
    for metric in metrics:
        for sample in metric.samples:
            if sample.name != f"{name}_total":
                continue
            if all(sample.labels.get(k) == v for k, v in match.items()):
                totals[tuple(sample.labels.get(k, "") for k in keys)] += sample.value
    return dict(totals)


VariantTotals = dict[tuple[str, str, str, bool], tuple[float, float]]
"""Rows answered and rows failed per (model, variant, epoch, pinned)."""


def variant_totals(metrics: Iterable[Metric], model: str | None = None) -> VariantTotals:
    """``bundle_requests_total`` as :data:`VariantTotals` (over endpoints), of ``model`` or every model:
    of every worker from :func:`collect`, of this process from ``REQUESTS.collect()``."""
    match = {} if model is None else {"model": model}
    counts = counter_totals(metrics, "bundle_requests", ("model", "variant", "epoch", "pinned", "outcome"), **match)
    totals: dict[tuple[str, str, str, bool], tuple[float, float]] = {}
    for (name, variant, epoch, pinned, outcome), n in counts.items():
        key = (name, variant, epoch, pinned == "true")
        ok, errors = totals.get(key, (0.0, 0.0))
        totals[key] = (ok + n, errors) if outcome == "ok" else (ok, errors + n)
    return totals


def histogram_buckets(metrics: Iterable[Metric], name: str, **match: str) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) pairs of histogram ``name`` over samples matching ``match``."""
    buckets: dict[float, float] = defaultdict(float)
    for metric in metrics:
        for sample in metric.samples:
            if sample.name == f"{name}_bucket" and all(sample.labels.get(k) == v for k, v in match.items()):
                buckets[float(sample.labels["le"])] += sample.value
    return sorted(buckets.items())
