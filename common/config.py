"""The one configuration file (``config.yaml``), validated with pydantic when the service starts.

Every setting has a single home here; an unknown key or a bad value is a start-up error that names
the key (``experiments.digits.variants.1.weight: ...``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_ENV = "BUNDLE_CONFIG"
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "config.yaml"

Name = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
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


class Experiment(Strict):
    salt: str = Field(min_length=1)
    variants: list[Variant] = Field(min_length=1)
    shadow: Variant | None = None

    @model_validator(mode="after")
    def _check(self) -> Experiment:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        if sum(v.weight for v in self.variants) <= 0:
            raise ValueError("at least one variant needs a weight above 0")
        if self.shadow and self.shadow.name in names:
            raise ValueError(f"shadow {self.shadow.name!r} must not also be a live variant")
        return self

    def variant(self, name: str) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)


class Config(Strict):
    service: ServiceSettings = ServiceSettings()
    batching: Batching = Batching()
    limits: Limits = Limits()
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
