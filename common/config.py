"""The one configuration file (``config.yaml``), validated with pydantic when the service starts.

Every setting has a single home here; an unknown key or a bad value is a start-up error that names
the key (``experiments.digits.variants.1.weight: ...``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_ENV = "BUNDLE_CONFIG"
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "config.yaml"

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
Name = Field(pattern=NAME_PATTERN)
ModelTag = Field(pattern=r"^[a-z0-9_.-]+:[A-Za-z0-9_.-]+$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServiceSettings(Strict):
    workers: Annotated[int, Field(ge=1)] | Literal["cpu_count"] = 2
    timeout_s: float = Field(30, gt=0)
    max_concurrency: int = Field(512, ge=1)
    retry_after_s: int = Field(1, ge=1)
    intra_op_threads: int = Field(1, ge=1)
    shadow_queue: int = Field(256, ge=1)
    access_log: bool = False
    tracing: bool = False
    direct_path: bool = True
    """The front door answers the hot inference routes itself (``protocols/direct.py``), past
    BentoML's context middleware, router and API wrapper (same answers, same metrics)."""

    max_connection_age_s: float | None = Field(1, gt=0)
    """An HTTP keep-alive connection older than this gets ``Connection: close`` on its next answer and
    the client opens a new one, which whichever worker is free first accepts (BentoML's workers share
    one listening socket). Without it, connections opened at once (a load balancer's pool, a load
    generator) can all stay on the worker that woke first. Each reconnection is an accept (and a TLS
    handshake, if the server terminates TLS: raise it then). ``null``: connections are never aged."""

    fork_workers: bool = True
    """BentoML starts one process, which imports the runtimes the configured models use and forks the
    workers, so that they share that memory instead of each importing it again (``serving/prefork.py``).
    ``false``: BentoML starts every worker as a new process."""

    pin_workers: bool | Literal["auto"] = "auto"
    """Each forked worker runs on one CPU of its own (``serving.prefork.placement``): its threads' hand-offs
    stay on one core. ``auto``: when the workers cover every CPU the server may use and
    ``intra_op_threads`` is 1; ``true``: always (round robin over those CPUs); ``false``: never."""

    @model_validator(mode="after")
    def _pinning_needs_forked_workers(self) -> ServiceSettings:
        if self.pin_workers is True and not self.fork_workers:
            raise ValueError("pin_workers: true needs fork_workers: true (the workers pinned are the forked ones)")
        return self

    def worker_count(self) -> int:
        return (os.cpu_count() or 1) if self.workers == "cpu_count" else int(self.workers)

    def in_flight_per_worker(self) -> int:
        return -(-self.max_concurrency // self.worker_count())


class Batching(Strict):
    enabled: bool = True
    max_batch_size: int = Field(64, ge=2)
    max_latency_ms: int = Field(1000, ge=1)


class Limits(Strict):
    max_rows: int = Field(1024, ge=1)
    max_body_bytes: int = Field(8_000_000, ge=1)
    max_image_bytes: int = Field(5_000_000, ge=1)
    max_image_pixels: int = Field(25_000_000, ge=1)

    @model_validator(mode="after")
    def _image_fits_body(self) -> Limits:
        if self.max_image_bytes >= self.max_body_bytes:
            raise ValueError("max_image_bytes must be below max_body_bytes (the image travels in the body)")
        return self


Weight = Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False)]
"""Any non-negative number up to 1e9 (a sum of larger ones can overflow)."""


class Variant(Strict):
    name: str = Name
    model: str = ModelTag
    weight: Weight = 1.0


class Guardrails(Strict):
    """A candidate that breaches one is rolled back whatever its accuracy; one that is not known yet
    (``unknown``) holds back a ``promote``, which needs every guardrail to hold."""

    max_error_rate: float = Field(0.01, ge=0, le=1)
    """Share of the candidate's rows answered with a server error."""
    max_p95_latency_ratio: float = Field(2.0, gt=0)
    """The candidate's p95 latency over the control's."""
    min_answers: int = Field(500, ge=1)
    """Served predictions the candidate and the control each need before their p95 latency ratio is
    judged (until then it is ``unknown``): the p95 of a handful of answers is their slowest one, such as
    a first call or a moment the machine was busy, not the variant's latency. A control at weight 0 (a
    rollout's last step) is judged on the answers it had, since it gets no more."""
    srm_p_value: float = Field(0.001, gt=0, lt=1)
    """A sample-ratio-mismatch p-value below this means the split itself is broken."""


class Decision(Strict):
    """How an experiment is decided (``GET /experiments/{model}/decision``): each candidate against the
    control, on the primary metric, with an always-valid test (``experiments/sequential.py``)."""

    control: str | None = Field(None, description="a variant name; the first variant when left out")
    metric: Literal["accuracy", "reward"] = "accuracy"
    margin: float = Field(0.005, ge=0, lt=1)
    """Non-inferiority margin, absolute (0.005 = half an accuracy point)."""
    alpha: float = Field(0.05, gt=0, lt=0.5)
    min_labels: int = Field(200, ge=1)
    """Labelled predictions each variant needs before any verdict but ``continue``."""
    guardrails: Guardrails = Guardrails()


class Rollout(Strict):
    """How a candidate is ramped by itself (``experiments/rollout.py``): one step at a time, each held
    until it has enough labels and time, the decision is not ``rollback`` and every guardrail holds."""

    steps: list[Annotated[float, Field(gt=0, le=100)]] = Field([1, 5, 25, 50, 100], min_length=1)
    """The candidate's share of routed traffic at each step, in percent, increasing, ending at 100."""
    min_labels: int = Field(200, ge=0)
    """Labelled predictions of the candidate gathered during a step before it may advance."""
    min_seconds: float = Field(300, ge=0)
    """Time at a step before it may advance."""
    on_breach: Literal["rollback", "pause"] = "rollback"
    """What a breached guardrail or a ``rollback`` decision does: weight 0 at once, or hold the step."""

    @model_validator(mode="after")
    def _increasing(self) -> Rollout:
        if any(b <= a for a, b in zip(self.steps, self.steps[1:])) or self.steps[-1] != 100:
            raise ValueError(f"steps must increase and end at 100, got {self.steps}")
        return self


class Experiment(Strict):
    salt: str = Field(min_length=1)
    variants: list[Variant] = Field(min_length=1)
    shadow: Variant | None = None
    decision: Decision = Decision()
    rollout: Rollout = Rollout()

    @model_validator(mode="after")
    def _check(self) -> Experiment:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        if sum(v.weight for v in self.variants) <= 0:
            raise ValueError("at least one variant needs a weight above 0")
        if self.shadow and self.shadow.name in names:
            raise ValueError(f"shadow {self.shadow.name!r} must not also be a live variant")
        if self.decision.control is not None and self.decision.control not in names:
            raise ValueError(f"decision.control {self.decision.control!r} is not one of the variants {names}")
        return self

    @property
    def control(self) -> Variant:
        """The variant every candidate is compared with."""
        return self.variant(self.decision.control) if self.decision.control else self.variants[0]

    def variant(self, name: str) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)


STORE_URL_ENV = "BUNDLE_STORE_URL"


class Store(Strict):
    """The experiment store: prediction log, feedback, decisions, weight history (``experiments/store.py``)."""

    url: str | None = None
    """SQLAlchemy URL (``postgresql://user@host:port/db``); empty: an SQLite file beside the model
    store. ``BUNDLE_STORE_URL`` overrides it."""
    log_predictions: bool = True
    queue_rows: int = Field(10_000, ge=1)
    """Log rows waiting per worker; beyond it rows are dropped (``bundle_log_dropped_total``)."""
    flush_ms: int = Field(100, ge=1)
    hash_user_ids: bool = True
    """Log a SHA-256 of each user id instead of the id."""
    retention_days: float | None = Field(30, gt=0)
    retention_rows: int | None = Field(10_000_000, ge=1)
    label_horizon_days: float = Field(7, gt=0)
    """A prediction still without feedback after this is counted as expired, no longer pending."""
    recent_window_s: int = Field(3600, ge=1)
    """The report's recent window, beside the whole experiment."""

    def resolved_url(self, model_store: Path) -> str:
        """The URL in force: the environment's, the configured one, or the default SQLite file."""
        return os.environ.get(STORE_URL_ENV) or self.url or f"sqlite:///{model_store / 'experiments.sqlite'}"


class Drift(Strict):
    """When a feature has drifted (``experiments/drift.py``): significant *and* material."""

    alpha: float = Field(0.01, gt=0, lt=0.5)
    """Family-wise (holm) or false-discovery (bh) level across one variant's features."""
    correction: Literal["holm", "bh"] = "holm"
    psi_threshold: float = Field(0.2, ge=0)
    """Population stability index at or above which a shift is material (0.1 slight, 0.25 major)."""
    min_rows: int = Field(30, ge=2)
    """Sampled rows a variant needs before its features are judged at all."""
    window_rows: int = Field(1000, ge=2)
    """The newest sampled rows (and logged answers) one check compares with the reference."""
    window_s: int = Field(86_400, ge=1)
    """Only rows served within this many seconds before the check."""


class Monitoring(Strict):
    """Input sampling, the drift check and its schedule (``docs/monitoring.md``)."""

    sample_fraction: float = Field(0.1, ge=0, le=1)
    """Share of answered groups whose inputs are kept in the experiment store; 0 disables sampling."""
    drift: Drift = Drift()
    check_every_s: int = Field(300, ge=0)
    """A scheduled drift check of every model this often, by one worker of all (a lease); 0: only on
    demand (``POST /experiments/{model}/drift``) or from cron."""
    dashboard_refresh_s: int = Field(30, ge=1)
    dashboard_window_s: int = Field(86_400, ge=60)
    """The dashboard's time axis: this many seconds back from now."""
    dashboard_buckets: int = Field(24, ge=2, le=500)
    quality_window_labels: int = Field(200, ge=1)
    """The dashboard's count window: accuracy and calibration over each variant's newest labels."""


GRPC_PORT_ENV = "BUNDLE_GRPC_PORT"


class BatchJobs(Strict):
    """Batch jobs the service runs for ``/score_file`` (``docs/batch.md``): each a ``python -m batch``
    process of its own, so online requests keep their workers."""

    max_jobs: int = Field(1, ge=1)
    """Jobs running at once, across the workers; a job beyond them waits for one to finish."""
    threads: int = Field(1, ge=1)
    """Runtime threads of each job: what is left of the cores answers online traffic."""


class Grpc(Strict):
    """The gRPC server of every worker: OIP's ``inference.GRPCInferenceService``, TF Serving's
    ``PredictionService`` and ``grpc.health.v1`` on one port (``docs/grpc.md``)."""

    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = Field(8001, ge=1, le=65535)
    """Triton's gRPC port, which tritonclient and KServe's examples assume; ``BUNDLE_GRPC_PORT``
    overrides it (the tests give every server a free one)."""
    shutdown_grace_s: float = Field(5, ge=0)
    """RPCs in flight when a worker stops, or when its connection is aged out, get this long to finish."""
    max_connection_age_s: float | None = Field(30, gt=0)
    """A client connection older than this is closed gracefully (HTTP/2 GOAWAY) and the client opens a
    new one, which the kernel places afresh on a worker (``SO_REUSEPORT``). Without it a channel stays on
    the worker it first reached: channels moved when a worker restarted would never come back to it, and
    a client's few channels hashed onto one worker would stay there. ``null``: connections are never aged."""

    def resolved_port(self) -> int:
        return int(os.environ.get(GRPC_PORT_ENV) or self.port)


class Repository(Strict):
    """The live model repository (``serving/repository.py``, ``docs/repository.md``): models loaded and
    unloaded while serving, and ``.bentomodel`` files imported from one directory."""

    import_dir: Path | None = None
    """The only directory imports are read from (``BUNDLE_IMPORT_DIR`` overrides it); none: imports
    are refused."""
    poll_s: float = Field(0.5, gt=0, le=60)
    """How often every worker reads the repository's wishes and the experiments in force."""
    controller_every_s: float = Field(1.0, gt=0, le=3600)
    """How often the rollout controller (one worker, under a lease) looks at every rollout."""

    def resolved_import_dir(self) -> Path | None:
        raw = os.environ.get(IMPORT_DIR_ENV) or self.import_dir
        return Path(raw).resolve() if raw else None


IMPORT_DIR_ENV = "BUNDLE_IMPORT_DIR"


class RateLimit(Strict):
    """A token bucket: ``burst`` tokens, refilled at ``requests`` per ``per_s`` seconds; a request
    spends one."""

    requests: int = Field(ge=1)
    per_s: float = Field(1, ge=0.001, le=86_400, allow_inf_nan=False)
    """Seconds to refill ``requests`` tokens, to the millisecond (pyrate-limiter's unit)."""
    burst: int | None = Field(None, ge=1)
    """Requests admitted at once from a full bucket; ``requests`` when left out."""


class ApiKey(Strict):
    name: str = Name
    """Named in the prediction log and in ``bundle_api_requests_total``."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """The key's SHA-256, lowercase hex (``printf %s "$KEY" | sha256sum``): the key is never stored."""
    rate_limit: RateLimit | None = None
    """This key's bucket; ``access.rate_limit`` when left out."""


class Access(Strict):
    """API keys and rate limits of the inference routes (``docs/security.md``). Applied live: an edit
    of ``config.yaml`` reaches every worker within a poll of the file (``experiments/live.py``)."""

    require_keys: bool = False
    """Inference needs one of ``keys`` (an empty list then refuses everyone: revoking the last key
    does not open the service)."""
    keys: list[ApiKey] = []
    rate_limit: RateLimit | None = None
    """Per key without its own limit, or per client address when keys are off; none: unlimited."""
    table_slots: int = Field(4096, ge=8)
    """Buckets shared by the workers (keys or client addresses at once); fixed at start."""

    @model_validator(mode="after")
    def _unique(self) -> Access:
        for field in ("name", "sha256"):
            values = [getattr(k, field) for k in self.keys]
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                raise ValueError(f"keys: {field} must be unique, got {twice} more than once")
        return self

    @property
    def active(self) -> bool:
        """Whether any request is checked at all (off: the front door pays one attribute check)."""
        return self.require_keys or self.rate_limit is not None


CACHE_REDIS_URL_ENV = "BUNDLE_CACHE_REDIS_URL"


class Cache(Strict):
    """The optional prediction cache (``serving/cache.py``, ``docs/performance.md``): one probability
    row per model tag and input row, so a repeated row is answered without a runtime call. Off, the
    request path pays one attribute check."""

    backend: Literal["off", "memory", "redis"] = "off"
    """``memory``: an LRU in each worker; ``redis``: one Redis shared by every worker and replica."""
    max_rows: int = Field(100_000, ge=1)
    """Rows the ``memory`` backend keeps per worker, least recently used dropped first (Redis is
    bounded by ``ttl_s`` and its own ``maxmemory``)."""
    redis_url: str | None = None
    """``redis://host:port/db`` of the ``redis`` backend; ``BUNDLE_CACHE_REDIS_URL`` overrides it."""
    ttl_s: float = Field(3600, gt=0)
    """How long Redis keeps a cached row."""

    @field_validator("backend", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        return "off" if value is False else value  # YAML reads a bare ``off`` as false

    @model_validator(mode="after")
    def _redis_has_url(self) -> Cache:
        if self.backend == "redis" and not self.resolved_redis_url():
            raise ValueError(f"backend redis needs redis_url (or {CACHE_REDIS_URL_ENV})")
        return self

    def resolved_redis_url(self) -> str | None:
        return os.environ.get(CACHE_REDIS_URL_ENV) or self.redis_url


class Config(Strict):
    service: ServiceSettings = ServiceSettings()
    batching: Batching = Batching()
    limits: Limits = Limits()
    store: Store = Store()
    access: Access = Access()
    grpc: Grpc = Grpc()
    monitoring: Monitoring = Monitoring()
    batch: BatchJobs = BatchJobs()
    repository: Repository = Repository()
    cache: Cache = Cache()
    experiments: dict[str, Experiment] = Field(min_length=1)

    def model_tags(self) -> list[str]:
        """Every stored model the configuration refers to, live or shadow, once each."""
        tags = [v.model for e in self.experiments.values() for v in e.variants]
        tags += [e.shadow.model for e in self.experiments.values() if e.shadow]
        return list(dict.fromkeys(tags))


class ConfigError(ValueError):
    """A configuration that must not start: the message names the file, the key and the problem."""


def config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV, DEFAULT_PATH))


def load(path: Path | None = None) -> Config:
    path = path or config_path()
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as err:
        raise ConfigError(f"{path}: cannot read the configuration: {err}") from err
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<top>'}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"{path}: invalid configuration: {problems}") from err
