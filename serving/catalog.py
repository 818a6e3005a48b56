"""The logical models the configuration serves, with each variant's stored metadata and runtime."""

from __future__ import annotations

import functools
from typing import Any, Mapping

import bentoml

from common import store
from common.config import Config
from common.schema import Schema
from runtimes import Runtime, load_runtime

SUMMARY_KEYS = ("metrics", "accuracy", "accuracy_delta_points", "agreement", "max_prob_diff",
                "mean_prob_diff", "size_ratio", "int8", "source_tag", "dataset")


class Catalog:
    """Reads every configured model's metadata at import; loads the runtimes only in a worker."""

    def __init__(self, config: Config, models: Mapping[str, bentoml.Model] | None = None):
        """``models`` by tag are read from the model store unless given (a test hands in its own)."""
        self.config = config
        self.models = dict(models) if models is not None else {tag: store.get(tag) for tag in config.model_tags()}
        for model in self.models.values():
            store.verify(model)
        self.schemas: dict[str, Schema] = {}
        for name, experiment in config.experiments.items():
            variants = [*experiment.variants, *([experiment.shadow] if experiment.shadow else [])]
            schemas = {v.model: Schema.from_metadata(self.models[v.model].info.metadata) for v in variants}
            if len(set(schemas.values())) != 1:
                raise ValueError(f"experiments.{name}: variants disagree on input shape or classes: "
                                 + ", ".join(f"{t} {s.input_shape} {len(s.classes)} classes"
                                             for t, s in schemas.items()))
            self.schemas[name] = next(iter(schemas.values()))
        self.runtimes: dict[str, Runtime] = {}

    def load_runtimes(self) -> None:
        threads = self.config.service.intra_op_threads
        self.runtimes = {tag: load_runtime(model, threads) for tag, model in self.models.items()}

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
                        "labels": dict(self.models[v.model].info.labels),
                        "metadata": {k: self.models[v.model].info.metadata[k] for k in SUMMARY_KEYS
                                     if k in self.models[v.model].info.metadata},
                    }
                    for v in variants
                ],
            }
        return out
