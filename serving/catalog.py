"""The models this worker serves, live: each stored model's metadata, its runtime once loaded, the
input schema of every logical model.

config.yaml's models are loaded when the worker starts; the model repository (``serving/repository.py``)
adds and removes others while it serves. Every change is one dictionary assignment or removal, so a
request sees a model whole or not at all, and ``runtimes`` is one mapping shared with the batch queues'
and the shadow's readers, never replaced.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Iterator, Mapping, Sequence

import bentoml

from common import store
from common.config import Config, Experiment
from common.errors import NotFoundError, RequestError
from common.logs import get_logger
from common.schema import Schema
from experiments.router import Router
from runtimes import Runtime, load_runtime

log = get_logger("catalog")
SUMMARY_KEYS = ("metrics", "accuracy", "accuracy_delta_points", "agreement", "max_prob_diff",
                "mean_prob_diff", "size_ratio", "int8", "source_tag", "dataset")


class Classes(Mapping[str, Sequence[str]]):
    """The class names of every logical model, read through to the catalogue's schemas, so that an
    experiment declared while serving is known to whoever holds this (the ledger grading feedback)."""

    def __init__(self, schemas: Mapping[str, Schema]):
        self._schemas = schemas

    def __getitem__(self, model: str) -> Sequence[str]:
        return self._schemas[model].classes

    def __iter__(self) -> Iterator[str]:
        return iter(self._schemas)

    def __len__(self) -> int:
        return len(self._schemas)


class Catalog:
    """Reads every configured model's metadata at import; loads the runtimes only in a worker."""

    def __init__(self, config: Config, models: Mapping[str, bentoml.Model] | None = None):
        """``models`` by tag are read from the model store unless given (a test hands in its own)."""
        self.config = config
        self.models = dict(models) if models is not None else {tag: store.get(tag) for tag in config.model_tags()}
        self.schemas: dict[str, Schema] = {}
        for name, experiment in config.experiments.items():
            try:
                self.declare(name, experiment)
            except RequestError as err:
                raise ValueError(f"experiments.{name}.{err}") from None
        self.runtimes: dict[str, Runtime] = {}
        """The models ready to answer, by tag: changed in place only (others hold this mapping)."""
        self.failures: dict[str, dict[str, str]] = {}
        """Models that failed to load, by tag: ``error`` says why, ``file`` names a damaged file."""
        self.pending: dict[str, str] = {}
        """Models being loaded or unloaded, by tag: ``loading`` or ``unloading``."""

    def load_runtimes(self) -> None:
        """Every configured model's runtime. One that fails to load (a file changed since it was
        stored, or any load error) is logged and kept in ``failures`` instead: the others serve, and
        routing leaves it out (``experiments/router.py``)."""
        self.runtimes.clear()
        self.failures.clear()
        for tag in self.config.model_tags():
            try:
                runtime = self.load(self.models[tag])
            except Exception as err:  # whatever broke one model must not stop the others from serving
                self.fail(tag, err)
                continue
            self.runtimes[tag] = runtime

    def load(self, model: bentoml.Model) -> Runtime:
        """``model``'s runtime, loaded (not yet served): slow, so never on the event loop."""
        runtime = load_runtime(model, self.config.service.intra_op_threads)
        if runtime.integrity.status == "unrecorded":
            log.warning("model files without a recorded hash were loaded unchecked",
                        extra={"model_tag": str(model.tag), "files": list(runtime.integrity.unchecked),
                               "remedy": store.remedy(model)})
        return runtime

    # -- live changes (serving/repository.py) ---------------------------------------------------------

    def add(self, model: bentoml.Model, runtime: Runtime) -> None:
        """Serve ``runtime`` as ``model``'s tag from now on (replacing any runtime it had)."""
        tag = str(model.tag)
        self.models[tag] = model
        self.runtimes[tag] = runtime
        self.failures.pop(tag, None)
        self.pending.pop(tag, None)

    def remove(self, tag: str) -> Runtime | None:
        """Stop serving ``tag``: its runtime, for the caller to drop (requests that already hold it
        finish on it). Its metadata stays, for the repository's listing."""
        self.pending.pop(tag, None)
        self.failures.pop(tag, None)
        return self.runtimes.pop(tag, None)

    def fail(self, tag: str, err: Exception | str) -> None:
        """``tag`` failed to load (or a live load was refused): kept out of routing, ``err`` says why."""
        file = err.file if isinstance(err, store.IntegrityError) else None
        self.failures[tag] = {"error": str(err), **({"file": file} if file else {})}
        self.pending.pop(tag, None)
        log.error("model not loaded", extra={"model_tag": tag, "reason": str(err)})

    def availability(self) -> tuple[set[str], dict[str, str]]:
        """The tags ready in this worker, and why every other known tag is not (failed, loading,
        unloading, or not loaded)."""
        ready = set(self.runtimes) - set(self.pending)
        reasons = {tag: "not loaded in this worker" for tag in self.models if tag not in ready}
        reasons.update((tag, f"{state} in this worker") for tag, state in self.pending.items())
        reasons.update((tag, failure["error"]) for tag, failure in self.failures.items())
        return ready, reasons

    def state(self, tag: str) -> dict[str, Any]:
        """A model's state as ``GET /models`` shows it: ``loaded`` with what its integrity check found,
        ``failed`` with why, ``loading``/``unloading``, or ``not loaded``."""
        if tag in self.failures:
            return {"status": "failed", **self.failures[tag]}
        if tag in self.runtimes:
            return {"status": "loaded", "integrity": self.runtimes[tag].integrity.describe()}
        return {"status": self.pending.get(tag, "not loaded")}

    # -- logical models -------------------------------------------------------------------------------

    def model(self, tag: str, field: str = "model") -> bentoml.Model:
        """A stored model's metadata by tag (read from the model store the first time), or the 404
        that names ``field``."""
        if tag not in self.models:
            try:
                found = bentoml.models.get(tag)
            except (bentoml.exceptions.BentoMLException, ValueError):
                found = None
            if found is None or str(found.tag) != tag:  # "name" alone would be the newest version
                raise NotFoundError(field, f"model {tag!r} is not in the model store",
                                    "a stored model's name:version (POST /v2/repository/index lists them)")
            self.models[tag] = found
        return self.models[tag]

    def declare(self, name: str, experiment: Experiment) -> None:
        """Learn the input schema of experiment ``name`` (new or changed) from its variants' stored
        metadata, or the RequestError naming the field: an unknown tag, variants that disagree on input
        shape or classes, or a schema other than the one ``name`` already serves (its prediction log,
        feedback and endpoints speak that one)."""
        fields = {f"variants.{i}.model": v.model for i, v in enumerate(experiment.variants)}
        if experiment.shadow is not None:
            fields["shadow.model"] = experiment.shadow.model
        schemas = {tag: Schema.from_metadata(self.model(tag, field).info.metadata, name)
                   for field, tag in fields.items()}
        if len(set(schemas.values())) != 1:
            raise RequestError("variants", "variants disagree on input shape or classes: " + ", ".join(
                f"{t} {s.input_shape} {len(s.classes)} classes" for t, s in schemas.items()),
                "the same input shape and classes in every variant")
        schema = next(iter(schemas.values()))
        served = self.schemas.get(name)
        if served is not None and served != schema:
            raise RequestError("variants", f"{name!r} serves input {served.input_shape} with classes "
                               f"{list(served.classes)}; {next(iter(schemas))} takes {schema.input_shape} with "
                               f"{list(schema.classes)}", "models of the schema the experiment serves")
        self.schemas[name] = schema

    def describe(self, router: Router) -> dict[str, Any]:
        """The catalogue as ``GET /models`` shows it: every experiment in force, each variant with its
        weight, load state and stored metadata. Built per call: models come and go while serving."""
        out: dict[str, Any] = {}
        for name in router.models:
            experiment = router.experiment(name)
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
                        "labels": dict(self.model(v.model).info.labels),
                        "metadata": {k: self.model(v.model).info.metadata[k] for k in SUMMARY_KEYS
                                     if k in self.model(v.model).info.metadata},
                    }
                    for v in variants
                ],
            }
        return out
