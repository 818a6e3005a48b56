"""The model repository over REST: Triton's repository extension (``tritonclient.http``'s
``get_model_repository_index``, ``load_model``, ``unload_model``, ``is_model_ready`` work against it)
and the admin routes that import a ``.bentomodel`` file and show every worker's models.

A model here is a stored model's tag (``wine_sklearn:v2``); the logical models of ``protocols/oip.py``
are experiments over them. Load and unload write a wish every worker follows
(``serving/repository.py``) and answer once every live worker is done: 200, or a 4xx naming why. The
routes that change state take the admin token (``BUNDLE_ADMIN_TOKEN``).
"""

from __future__ import annotations

from typing import Annotated, Any

import bentoml
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from common import store
from common.errors import UnavailableError
from protocols.auth import AdminAuth
from protocols.guard import Paths
from protocols.rest import Body, NativeRoute, ProtocolRoute, openapi_body, parse, read_json
from serving.catalog import Catalog
from serving.repository import ModelRepository

INDEX, IMPORT, MODELS = "/v2/repository/index", "/admin/models/import", "/admin/models"
GUARD = Paths(any_media=("/v2/repository/",), fixed=frozenset({INDEX, IMPORT, MODELS}))
"""Triton's client posts the index and load requests without a content type."""
REASON_MAX = 1000
router = APIRouter(route_class=ProtocolRoute)
admin = APIRouter(route_class=NativeRoute)


async def _repository() -> ModelRepository:
    return bentoml.get_current_service().repository


CurrentRepository = Annotated[ModelRepository, Depends(_repository)]


class IndexRequest(BaseModel):
    repository_name: str = ""
    ready: bool = Field(False, description="only the models ready in this worker")


class IndexEntry(BaseModel):
    name: str = Field(description="the model's tag")
    version: str
    state: str = Field(description="READY, LOADING, UNLOADING or UNAVAILABLE, in the worker that answered")
    reason: str


class LoadParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field("", max_length=REASON_MAX, description="kept with the wish in the store")


class LoadRequest(BaseModel):
    parameters: LoadParameters = LoadParameters()


class UnloadParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    unload_dependents: bool = Field(False, description="Triton's; these models have no dependents")
    force: bool = Field(False, description="unload even while a variant routes to it with weight above 0")
    reason: str = Field("", max_length=REASON_MAX)


class UnloadRequest(BaseModel):
    parameters: UnloadParameters = UnloadParameters()


class ImportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="a .bentomodel file under the server's import directory (relative to it, "
                                  "or absolute)")
    load: bool = Field(True, description="load it in every worker once imported")
    reason: str = Field("", max_length=REASON_MAX)


@router.post(INDEX, openapi_extra=openapi_body(IndexRequest), response_model=list[IndexEntry])
async def index(request: Request, repository: CurrentRepository) -> list[dict[str, Any]]:
    """Every stored model and its state in the worker that answers (``GET /admin/models``: all of them)."""
    body = _optional(IndexRequest, await request.body())
    return await run_in_threadpool(repository.index, body.ready)


@router.post("/v2/repository/models/{name}/load", dependencies=[AdminAuth], openapi_extra=openapi_body(LoadRequest))
async def load(name: str, request: Request, repository: CurrentRepository) -> dict[str, Any]:
    """Load a stored model in every worker; it must reproduce its stored test-split probabilities.
    Answers once every live worker has it ready; a refusal names why and leaves it unloaded."""
    body = _optional(LoadRequest, await request.body())
    return await run_in_threadpool(repository.load, name, body.parameters.reason or "load requested")


@router.post("/v2/repository/models/{name}/unload", dependencies=[AdminAuth],
             openapi_extra=openapi_body(UnloadRequest))
async def unload(name: str, request: Request, repository: CurrentRepository,
                 force: Annotated[bool, Query(description="the same as parameters.force")] = False,
                 ) -> dict[str, Any]:
    """Unload a model from every worker; refused (409) while a variant routes to it with weight above 0,
    unless forced."""
    body = _optional(UnloadRequest, await request.body())
    return await run_in_threadpool(repository.unload, name, force or body.parameters.force,
                                   body.parameters.reason or "unload requested")


@admin.post(IMPORT, dependencies=[AdminAuth], openapi_extra=openapi_body(ImportRequest))
async def import_model(request: Request, repository: CurrentRepository) -> dict[str, Any]:
    """Admin: a ``.bentomodel`` file from the import directory into the model store, its files checked
    against the hashes it was stored with, then (``load``) loaded in every worker."""
    body = await read_json(request, ImportRequest)
    model = await run_in_threadpool(store.import_model, body.path, repository.settings.resolved_import_dir())
    out: dict[str, Any] = {"name": str(model.tag), "imported": True}
    if body.load:
        out["load"] = await run_in_threadpool(repository.load, str(model.tag), body.reason or f"imported {body.path}")
    return out


@admin.get(MODELS)
async def models(repository: CurrentRepository) -> dict[str, Any]:
    """Every live worker's models and states (with RSS), and the repository's wishes."""
    return await run_in_threadpool(repository.workers)


router.include_router(admin)


def tag_readiness(catalog: Catalog, tag: str) -> dict[str, Any]:
    """A model tag's readiness in this worker (``/v2/models/{tag}/ready``): 200 when it answers here,
    404 for a tag not stored, else 503 saying why (Triton's client reads the status alone)."""
    catalog.model(tag, "name")
    ready, reasons = catalog.availability()
    if tag not in ready:
        raise UnavailableError("name", f"model {tag} is not ready in this worker: {reasons.get(tag, 'not loaded')}")
    return {"name": tag, "ready": True}


def _optional(body: type[Body], raw: bytes) -> Body:
    """Triton's client may post no body at all: the defaults then."""
    return parse(body, raw) if raw.strip() else body()
