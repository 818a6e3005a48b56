"""Progressive rollout over REST: start one, pause, resume or abort it (admin token), and see where it is.

``POST /experiments/{model}/rollout`` {"candidate", "policy": overrides of the experiment's rollout
policy}; ``POST .../rollout/pause``, ``.../resume``, ``.../abort`` {"reason"}; ``GET
/experiments/{model}/rollout``: step, share, labels and time at this step, what the next step still
needs, state and the steps taken. The controller itself runs in the background
(``experiments/rollout.py``).
"""

from __future__ import annotations

from typing import Annotated, Any

import bentoml
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from experiments.rollout import RolloutController
from protocols.auth import AdminAuth
from protocols.control import REASON_MAX
from protocols.guard import Paths
from protocols.rest import NativeRoute, openapi_body, parse

GUARD = Paths()
"""Every route here has the model in its path: none is fixed."""
router = APIRouter(route_class=NativeRoute)


async def _controller() -> RolloutController:
    """Async on purpose, as ``rest.CurrentDataPlane``: no thread-pool hop per request."""
    return bentoml.get_current_service().rollouts


CurrentRollouts = Annotated[RolloutController, Depends(_controller)]


class RolloutStart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    candidate: str = Field(description="the variant to ramp: a live variant's name, not the control")
    policy: dict[str, Any] = Field({}, description="overrides of the experiment's rollout policy: steps, "
                                   "min_labels, min_seconds, on_breach")
    reason: str = Field("", max_length=REASON_MAX, description="kept in the weight history")


class RolloutAction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field("", max_length=REASON_MAX, description="kept with the rollout's state")


async def _body(request: Request, body: type[RolloutAction]) -> RolloutAction:
    """An action's body: an empty one is ``{}``."""
    return parse(body, await request.body() or b"{}")


@router.post("/experiments/{model}/rollout", dependencies=[AdminAuth], openapi_extra=openapi_body(RolloutStart))
async def start(model: str, request: Request, rollouts: CurrentRollouts) -> dict[str, Any]:
    """Admin: ramp the candidate from the policy's first step; 409 while a rollout of the model is under way."""
    body = parse(RolloutStart, await request.body())
    return await run_in_threadpool(rollouts.start, model, body.candidate, body.policy, body.reason)


@router.post("/experiments/{model}/rollout/pause", dependencies=[AdminAuth],
             openapi_extra=openapi_body(RolloutAction))
async def pause(model: str, request: Request, rollouts: CurrentRollouts) -> dict[str, Any]:
    """Admin: hold the rollout at its step (the weights stay)."""
    return await run_in_threadpool(rollouts.pause, model, (await _body(request, RolloutAction)).reason)


@router.post("/experiments/{model}/rollout/resume", dependencies=[AdminAuth],
             openapi_extra=openapi_body(RolloutAction))
async def resume(model: str, request: Request, rollouts: CurrentRollouts) -> dict[str, Any]:
    """Admin: run a paused rollout again; its step starts over."""
    return await run_in_threadpool(rollouts.resume, model, (await _body(request, RolloutAction)).reason)


@router.post("/experiments/{model}/rollout/abort", dependencies=[AdminAuth],
             openapi_extra=openapi_body(RolloutAction))
async def abort(model: str, request: Request, rollouts: CurrentRollouts) -> dict[str, Any]:
    """Admin: stop the rollout and take the candidate out (weight 0)."""
    return await run_in_threadpool(rollouts.abort, model, (await _body(request, RolloutAction)).reason)


@router.get("/experiments/{model}/rollout")
async def status(model: str, rollouts: CurrentRollouts) -> dict[str, Any]:
    """Step, share, labels and seconds at this step, what the next step still needs, state, history."""
    return await run_in_threadpool(rollouts.status, model)

