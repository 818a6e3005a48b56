"""The logical models the configuration serves, with each variant's stored metadata and runtime."""

from __future__ import annotations

import functools
from typing import Any
from collections.abc import Mapping

import bentoml

from common import store
from common.config import Config
from common.logs import get_logger
from common.schema import Schema
from runtimes import Runtime, load_runtime

log = get_logger("catalog")
SUMMARY_KEYS = ("metrics", "accuracy", "accuracy_delta_points", "agreement", "max_prob_diff",
                "mean_prob_diff", "size_ratio", "int8", "source_tag", "dataset")


class Catalog:
    """Reads every configured model's metadata at import; loads the runtimes only in a worker."""

    def __init__(self, config: Config, models: Mapping[str, bentoml.Model] | None = None):
        """``models`` by tag are read from the model store unless given (a test hands in its own)."""
        self.config = config
        self.models = dict(models) if models is not None else {tag: store.get(tag) for tag in config.model_tags()}
        self.schemas: dict[str, Schema] = {}
        for name, experiment in config.experiments.items():
            variants = [*experiment.variants, *([experiment.shadow] if experiment.shadow else [])]
            schemas = {v.model: Schema.from_metadata(self.models[v.model].info.metadata, name)
                       for v in variants}
            if len(set(schemas.values())) != 1:
                raise ValueError(f"experiments.{name}: variants disagree on input shape or classes: "
                                 + ", ".join(f"{t} {s.input_shape} {len(s.classes)} classes"
                                             for t, s in schemas.items()))
            self.schemas[name] = next(iter(schemas.values()))
        self.runtimes: dict[str, Runtime] = {}
        self.failures: dict[str, dict[str, str]] = {}
        """Models that failed to load, by tag: ``error`` says why, ``file`` names a damaged file."""

    def load_runtimes(self) -> None:
        """Every model's runtime. One that fails to load (a file changed since it was stored, or any
        load error) is logged and kept in ``failures`` instead: the others serve, and routing leaves
        it out (``experiments/router.py``)."""
        threads = self.config.service.intra_op_threads
        self.runtimes, self.failures = {}, {}
        for tag, model in self.models.items():
            try:
                runtime = load_runtime(model, threads)
            except Exception as err:  # whatever broke one model must not stop the others from serving
                file = err.file if isinstance(err, store.IntegrityError) else None
                self.failures[tag] = {"error": str(err), **({"file": file} if file else {})}
                log.error("model not loaded", extra={"model_tag": tag, "reason": str(err)})
                continue
            self.runtimes[tag] = runtime
            if runtime.integrity.status == "unrecorded":
                log.warning("model files without a recorded hash were loaded unchecked",
                            extra={"model_tag": tag, "files": list(runtime.integrity.unchecked),
                                   "remedy": store.remedy(model)})
        self.__dict__.pop("description", None)  # built before the load, it would say "not loaded"

    def state(self, tag: str) -> dict[str, Any]:
        """A model's load state as ``GET /models`` shows it: ``loaded`` with what its integrity check
        found, ``failed`` with why, or ``not loaded`` (a process that serves nothing)."""
        if tag in self.failures:
            return {"status": "failed", **self.failures[tag]}
        if tag in self.runtimes:
            return {"status": "loaded", "integrity": self.runtimes[tag].integrity.describe()}
        return {"status": "not loaded"}

    @functools.cached_property
    def description(self) -> dict[str, Any]:
        """The catalogue as ``GET /models`` shows it, built once: the models served do not change while
        the service runs. Read-only: every caller shares it."""
        out: dict[str, Any] = {}
        for name, experiment in self.config.experiments.items():
            variants = [*experiment.variants, *([experiment.shadow] if experiment.shadow else [])]
            out[name] = {
                "input": self.schemas[name].describe(),
                "variants": [
                    {
                        "name": v.name,
                        "model_tag": v.model,
                        "weight": v.weight,
                        "shadow": v is experiment.shadow,
                        **self.state(v.model),
                        "labels": dict(self.models[v.model].info.labels),
                        "metadata": {k: self.models[v.model].info.metadata[k] for k in SUMMARY_KEYS
                                     if k in self.models[v.model].info.metadata},
                    }
                    for v in variants
                ],
            }
        return out
