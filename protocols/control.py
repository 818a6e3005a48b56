"""The control plane over REST: the catalogue, the live experiments, their reports and the admin change.

``GET /models``, ``GET /experiments``, ``GET /experiments/{model}/report`` read; ``PUT
/experiments/{model}`` changes weights and shadow with the admin token (``BUNDLE_ADMIN_TOKEN``).
"""

from __future__ import annotations

import hmac
import os
from typing import Annotated, Any

from fastapi import APIRouter, Header
from pydantic import BaseModel, ConfigDict, Field

from common import metrics
from common.config import Variant, Weight
from common.errors import ForbiddenError, RequestError, UnauthorizedError
from experiments import report
from protocols.guard import Paths
from protocols.rest import CurrentDataPlane, error_response

ADMIN_TOKEN_ENV = "BUNDLE_ADMIN_TOKEN"
GUARD = Paths(fixed=frozenset({"/models", "/experiments"}))
router = APIRouter()


class ExperimentChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weights: dict[str, Weight] | None = None
    shadow: Variant | None = Field(None, description="null removes the shadow; leave out to keep it")


def _check_admin(authorization: str | None) -> None:
    """The admin token, compared in constant time, or the 403 (no token configured) or 401 to answer."""
    token = os.environ.get(ADMIN_TOKEN_ENV)
    if not token:
        raise ForbiddenError("Authorization", "admin endpoints are disabled",
                             f"set {ADMIN_TOKEN_ENV} on the server to enable them")
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        raise UnauthorizedError("Authorization", "a valid bearer token is required", "Bearer <admin token>")


@router.get("/models")
def models(dataplane: CurrentDataPlane) -> dict[str, Any]:
    """The catalogue: logical models, variants, model tags, input schema, stored metadata."""
    return dataplane.catalog.description


@router.get("/experiments")
def experiments(dataplane: CurrentDataPlane) -> dict[str, Any]:
    """Configuration in force, live rows per variant, configured against observed share."""
    return report.overview(dataplane.router, metrics.collect())


@router.get("/experiments/{model}/report")
def experiment_report(model: str, dataplane: CurrentDataPlane) -> Any:
    """Traffic against weights with a sample-ratio-mismatch test, latency, labels, shadow."""
    router = dataplane.router
    try:
        experiment = router.experiment(model)
    except RequestError as err:
        return error_response(err)
    return report.build(model, experiment, router.epoch(model), metrics.collect())


@router.put("/experiments/{model}")
def change_experiment(model: str, change: ExperimentChange, dataplane: CurrentDataPlane,
                      authorization: Annotated[str | None, Header()] = None) -> Any:
    """Admin: new weights and/or shadow, applied by every worker within a second, kept on restart."""
    shadow = change.shadow.model_dump() if change.shadow else (None if "shadow" in change.model_fields_set
                                                               else ...)
    try:
        _check_admin(authorization)
        experiment = dataplane.live.update(model, change.weights, shadow)
    except RequestError as err:
        return error_response(err)
    return {"model": model, "epoch": dataplane.router.epoch(model), **experiment.model_dump()}
