"""``POST /feedback``: outcomes joined to the predictions they grade, for the experiment's decision.

An application posts the true label (a class name as answers give it, or its index) or a numeric
``reward`` per prediction id (or per its own ``id``), minutes or hours after the answer. Each item is
answered on its own: ``matched``, ``duplicate``, ``unknown_id`` or ``invalid`` with the reason, so one
bad item never rejects the others. The route has its own bearer token (``BUNDLE_FEEDBACK_TOKEN``),
checked before the body is read, so an application can post labels without admin rights.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from protocols.auth import FeedbackAuth
from protocols.guard import Paths
from protocols.rest import CurrentDataPlane, NativeRoute, describe, openapi_body, read_json

PATH = "/feedback"
MAX_ITEMS = 10_000
"""Items per call (the issue's contract): ~1 MB of JSON, joined in one transaction."""
GUARD = Paths(fixed=frozenset({PATH}))
router = APIRouter(route_class=NativeRoute)


class FeedbackItem(BaseModel):
    """One outcome. Checked item by item against the store (an unknown class is that item's
    ``invalid``), so the body's schema only bounds its shape."""

    model_config = ConfigDict(extra="forbid")
    prediction_id: str | None = Field(None, max_length=64, description="from the answer")
    id: str | None = Field(None, max_length=64, description="your own id, sent with the prediction")
    label: str | int | None = Field(None, description="the true class: a name as answers give it, or its index")
    reward: float | None = Field(None, description="a numeric outcome, for experiments decided on mean reward")


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    feedback: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_ITEMS,
                                           description=f"up to {MAX_ITEMS} items shaped as FeedbackItem")


@router.post(PATH, dependencies=[FeedbackAuth], openapi_extra=openapi_body(FeedbackBody))
async def feedback(request: Request, dataplane: CurrentDataPlane) -> dict[str, Any]:
    """Join outcomes to predictions; one result per item, in order, and the count of each status."""
    body = await read_json(request, FeedbackBody)
    results: list[dict[str, Any] | None] = [None] * len(body.feedback)
    valid: dict[int, dict[str, Any]] = {}
    for index, raw in enumerate(body.feedback):
        try:
            valid[index] = FeedbackItem.model_validate(raw).model_dump(exclude_none=True)
        except ValidationError as err:
            results[index] = {**_ids_of(raw), "status": "invalid", "reason": describe(err)}
    joined = await run_in_threadpool(dataplane.ledger.feedback, list(valid.values())) if valid else []
    for index, result in zip(valid, joined):
        results[index] = result
    return {"results": results, "counts": dict(Counter(r["status"] for r in results if r))}


def _ids_of(raw: dict[str, Any]) -> dict[str, Any]:
    """The ids an invalid item named, so the caller can tell which of its items it was."""
    return {key: raw[key] for key in ("prediction_id", "id") if isinstance(raw.get(key), str)}
