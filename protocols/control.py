"""The control plane over REST: the catalogue, the live experiments, their reports and the admin change.

``GET /models``, ``GET /experiments``, ``GET /experiments/{model}/report`` read; with the admin token
(``BUNDLE_ADMIN_TOKEN``) ``PUT /experiments/{model}`` changes weights and shadow, ``POST
/experiments/{model}/variants`` and ``DELETE /experiments/{model}/variants/{name}`` add and remove
variants. Every change is written to the experiment store (``experiments/live.py``) and its history.
"""

from __future__ import annotations

from typing import Annotated, Any
from collections.abc import Callable

import bentoml
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from common import metrics
from common.config import Experiment, ModelTag, Name, Variant, Weight
from common.errors import NotFoundError
from experiments import report
from experiments.repositorystore import RepositoryStore
from experiments.store import StoreUnavailable
from protocols.auth import AdminAuth
from protocols.guard import Paths
from protocols.rest import CurrentDataPlane, NativeRoute, openapi_body, read_json
from serving.dataplane import DataPlane

GUARD = Paths(fixed=frozenset({"/models", "/experiments"}))
HISTORY_LIMIT = 1000
"""Weight changes one ``GET /experiments/{model}/history`` lists at most, newest first."""
REASON_MAX = 1000
router = APIRouter(route_class=NativeRoute)


class ExperimentChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weights: dict[str, Weight] | None = None
    shadow: Variant | None = Field(None, description="null removes the shadow; leave out to keep it")
    reason: str = Field("", max_length=REASON_MAX, description="kept in the weight history")


@router.get("/models")
def models(dataplane: CurrentDataPlane) -> dict[str, Any]:
    """The catalogue: logical models, variants, model tags, input schema, stored metadata."""
    return dataplane.catalog.describe(dataplane.router)


class NewVariant(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Name
    model: str = ModelTag
    weight: Weight = 0.0
    salt: str | None = Field(None, min_length=1, description="only when creating the experiment; default: "
                                                             "the model name")
    reason: str = Field("", max_length=REASON_MAX, description="kept in the weight history")


@router.get("/experiments")
def experiments(dataplane: CurrentDataPlane) -> dict[str, Any]:
    """The experiments in force, live rows per variant, configured against observed share; per
    experiment its ``source`` and ``version`` in the store, and ``config``: whether config.yaml declares
    it and whether that declaration is what is in force. Rows are counted over every replica (the store),
    or by this replica when the store is down (``counts_from``)."""
    totals, counted = dataplane.ledger.traffic(metrics.collect())
    out = report.overview(dataplane.router, totals)
    out["counts_from"] = counted
    for model, state in dataplane.live.describe().items():
        if model in out["experiments"]:
            out["experiments"][model].update(state)
    return out


@router.get("/experiments/{model}/report")
async def experiment_report(model: str, dataplane: CurrentDataPlane) -> dict[str, Any]:
    """Traffic against weights with a sample-ratio-mismatch test, latency, labels, shadow, and the live
    outcome metrics per variant from the feedback (without them, not failing, when the store is down)."""
    router_ = dataplane.router
    experiment = router_.experiment(model)
    samples = metrics.collect()
    totals, counted = await run_in_threadpool(dataplane.ledger.traffic, samples, model)
    out = report.build(model, experiment, router_.epoch(model), samples, totals, counted)
    try:
        out["outcomes"] = await run_in_threadpool(dataplane.ledger.outcomes, model, experiment,
                                                  router_.epoch(model))
    except StoreUnavailable as err:
        out["outcomes"] = {"error": str(err)}
    report.by_user(out, out["outcomes"].get("srm_by_user", {"p_value": None}))
    out.update(await run_in_threadpool(bentoml.get_current_service().rollouts.summary, model))
    return out


@router.put("/experiments/{model}", dependencies=[AdminAuth], openapi_extra=openapi_body(ExperimentChange))
async def change_experiment(model: str, request: Request, dataplane: CurrentDataPlane) -> dict[str, Any]:
    """Admin: new weights and/or shadow, applied by every worker within a second, kept on restart."""
    change = await read_json(request, ExperimentChange)
    shadow = change.shadow.model_dump() if change.shadow else (None if "shadow" in change.model_fields_set
                                                               else ...)
    experiment = await run_in_threadpool(dataplane.live.update, model, change.weights, shadow,
                                         _recorder(dataplane, model, "admin", change.reason))
    return _in_force(dataplane, model, experiment)


@router.post("/experiments/{model}/variants", dependencies=[AdminAuth], openapi_extra=openapi_body(NewVariant))
async def add_variant(model: str, request: Request, dataplane: CurrentDataPlane) -> dict[str, Any]:
    """Admin: a variant serving a stored model (weight 0 unless given), creating the experiment if there
    is none; its model is wished loaded in every worker, and stays so on restart."""
    body = await read_json(request, NewVariant)
    reason = body.reason or f"variant {body.name} of {model} added"
    experiment = await run_in_threadpool(dataplane.live.add_variant, model, body.name, body.model, body.weight,
                                         body.salt, _recorder(dataplane, model, "admin", reason))
    await run_in_threadpool(RepositoryStore(dataplane.ledger.store).request, body.model, "loaded", reason)
    return _in_force(dataplane, model, experiment)


@router.delete("/experiments/{model}/variants/{name}", dependencies=[AdminAuth])
async def remove_variant(model: str, name: str, dataplane: CurrentDataPlane, force: bool = False,
                         reason: Annotated[str, Query(max_length=REASON_MAX)] = "") -> dict[str, Any]:
    """Admin: remove a variant; refused (409) while it has weight unless ``force=true``, and for the last
    one. Its model stays loaded (``POST /v2/repository/models/{name}/unload`` unloads it)."""
    record = _recorder(dataplane, model, "admin", reason or f"variant {name} removed")
    experiment = await run_in_threadpool(dataplane.live.remove_variant, model, name, force, record)
    return _in_force(dataplane, model, experiment)


class Verdict(BaseModel):
    """An admin's promote or rollback of one candidate."""

    model_config = ConfigDict(extra="forbid")
    variant: str = Field(description="the candidate: a live variant's name")
    reason: str = Field("", max_length=REASON_MAX, description="kept in the weight history")


@router.get("/experiments/{model}/decision")
async def decision(model: str, dataplane: CurrentDataPlane) -> dict[str, Any]:
    """Per candidate: difference to control with its always-valid interval, labels, guardrails, verdict."""
    router_ = dataplane.router
    experiment = router_.experiment(model)
    return await run_in_threadpool(dataplane.ledger.decide, model, experiment, router_.epoch(model),
                                   metrics.collect())


@router.get("/experiments/{model}/history")
async def history(model: str, dataplane: CurrentDataPlane,
                  limit: Annotated[int, Query(ge=1, le=HISTORY_LIMIT)] = HISTORY_LIMIT) -> dict[str, Any]:
    """Every weight change of the experiment, newest first: time, source, old and new weights, reason."""
    dataplane.router.experiment(model)
    return {"model": model, "changes": await run_in_threadpool(dataplane.ledger.history, model, limit)}


@router.post("/experiments/{model}/promote", dependencies=[AdminAuth], openapi_extra=openapi_body(Verdict))
async def promote(model: str, request: Request, dataplane: CurrentDataPlane) -> dict[str, Any]:
    """Admin: the candidate takes all the weight; the others stay loaded at weight 0."""
    body = await read_json(request, Verdict)
    return await _reweigh(dataplane, model, body, "promote",
                          lambda v: 1.0 if v.name == body.variant else 0.0)


@router.post("/experiments/{model}/rollback", dependencies=[AdminAuth], openapi_extra=openapi_body(Verdict))
async def rollback(model: str, request: Request, dataplane: CurrentDataPlane) -> dict[str, Any]:
    """Admin: the candidate's weight goes to 0; the others keep theirs."""
    body = await read_json(request, Verdict)
    return await _reweigh(dataplane, model, body, "rollback",
                          lambda v: 0.0 if v.name == body.variant else v.weight)


async def _reweigh(dataplane: DataPlane, model: str, body: Verdict, source: str,
                   weight: Callable[[Variant], float]) -> dict[str, Any]:
    experiment = dataplane.router.experiment(model)
    if experiment.variant(body.variant) is None:
        raise NotFoundError("variant", f"unknown variant {body.variant!r} of {model!r}",
                            ", ".join(v.name for v in experiment.variants))
    weights = {v.name: weight(v) for v in experiment.variants}
    changed = await run_in_threadpool(dataplane.live.update, model, weights, ...,
                                      _recorder(dataplane, model, source, body.reason), source)
    return _in_force(dataplane, model, changed)


def _in_force(dataplane: DataPlane, model: str, experiment: Experiment) -> dict[str, Any]:
    """An admin change's answer: the experiment as written, its ``epoch`` and its store ``version``; the
    change is in force in every worker of a replica once its ``bundle_experiment_version`` reaches it."""
    version = dataplane.live.describe()[model]["version"]
    return {"model": model, "epoch": dataplane.router.epoch(model), "version": version, **experiment.model_dump()}


def _recorder(dataplane: DataPlane, model: str, source: str,
              reason: str) -> Callable[[Experiment | None, Experiment], None]:
    """The weight history entry of one change, written by the worker that made it (``before`` None: the
    change created the experiment)."""
    def record(before: Experiment | None, after: Experiment) -> None:
        old = {v.name: v.weight for v in before.variants} if before else {}
        dataplane.ledger.record_change(model, source, old, {v.name: v.weight for v in after.variants}, reason)
    return record
