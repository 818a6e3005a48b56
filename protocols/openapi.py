"""The service's OpenAPI document (``/docs.json``, and the bento's ``openapi.yaml``), valid as served.

BentoML builds it (``_bentoml_sdk/service/openapi.py``: ``generate_spec``) from two sources: FastAPI's
``get_openapi`` for the mounted app, whose routes declare everything themselves (``protocols/rest.py``:
bodies, errors, ``{version}``; ``protocols/auth.py``: bearer schemes), and its own description of the
``@bentoml.api`` endpoints. Three faults cannot be fixed where the routes are declared, because
BentoML has no setting for them, so :class:`DocumentedService` (the service class ``service.py`` hands
``@bentoml.service``; BentoML's own hook for a service's behaviour) corrects the generated document:

- the version: BentoML labels the document OpenAPI 3.0.2 while FastAPI and pydantic write JSON Schema
  2020-12 (``anyOf`` with ``null``, numeric ``exclusiveMinimum``), the schema dialect of OpenAPI 3.1;
  ``generate_spec`` takes the version as an argument, so the document is generated as 3.1.0;
- the API endpoints' bodies: BentoML flattens each schema to the first branch of every union (``str |
  None`` becomes ``str`` with a ``null`` default, a contradiction) and keeps in the components its
  validation-mode schemas, typed ``tensor`` and ``file`` (not JSON Schema types) and referenced
  nowhere; the pydantic schemas of the endpoints' inputs and outputs replace both;
- their errors: BentoML documents its own 400/404/500 bodies, while ours answer in the native
  ``{"error", "field", "expected"}`` shape (BentoML's own refusal of a body that does not fit the
  declared types, ``{"error", "detail"}``, stays possible), and the front door's 503 (``Retry-After``)
  is missing;
- a task's routes (``/submit``, ``/status``, ``/get``, ``/retry``, ``/cancel``): BentoML documents a
  status schema whose values are not the ones it sends (``success``, not ``completed``), gives
  ``/cancel`` the operation id of ``/retry``, and answers its own refusals as ``{"error"}``.

The inference routes' 429 (over a caller's rate limit, ``protocols/access.py``) is documented with its
``Retry-After`` beside the other refusals; the routes are the front door's (``Paths.inference``).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, NotRequired

from _bentoml_impl.tasks import ResultStatus
from _bentoml_sdk.service.factory import Service
from _bentoml_sdk.service.openapi import REF_TEMPLATE, generate_spec
from bentoml._internal.service.openapi.specification import OpenAPISpecification, PathItem
from pydantic import Field, TypeAdapter
from typing_extensions import TypedDict

from protocols.guard import Paths, RequestGuard
from protocols.rest import FlatErrorBody, error_responses

OPENAPI_VERSION = "3.1.0"
SCHEMA_REF = re.compile(r'"\$ref": "#/components/schemas/([^"]+)"')
PATH_PARAMETER = re.compile(r"\{\w+\}")
RATE_LIMITED = "429"
TASK_STEPS = {"submit": "post", "status": "get", "get": "get", "retry": "post", "cancel": "put"}
"""The routes BentoML adds to a task's own, by their method."""
TASK_STATUS = "TaskStatusResponse"


class InvalidInputBody(TypedDict):
    """BentoML's answer to a body that does not fit an API endpoint's declared types."""

    error: str
    detail: Annotated[list[dict[str, Any]], Field(description="pydantic's errors, each with its loc and msg")]


class TaskStatus(TypedDict):
    """A task's state (``/submit`` and ``/retry`` answer only its id and status)."""

    task_id: str
    status: Literal[tuple(s.value for s in ResultStatus)]  # type: ignore[misc]
    created_at: NotRequired[str]
    executed_at: NotRequired[str | None]


class DocumentedService(Service):  # type: ignore[type-arg]
    """A BentoML service whose OpenAPI document validates (see the module's docstring)."""

    @property
    def openapi_spec(self) -> OpenAPISpecification:
        spec = generate_spec(self, openapi_version=OPENAPI_VERSION)
        document = json.loads(json.dumps(spec.asdict()))  # plain JSON: status codes become strings
        schemas = document["components"]["schemas"]
        errors = {str(status): error for status, error in error_responses(False, InvalidInputBody).items()}
        for api in self.apis.values():
            operation = document["paths"][api.route]["post"]
            [request] = operation["requestBody"]["content"].values()
            request["schema"] = _component_schema(api.input_spec, schemas)
            answer = operation["responses"]["200"]
            [media] = answer["content"].values()
            media["schema"] = _component_schema(api.output_spec, schemas)
            operation["responses"] = {"200": answer, **errors}
            if api.is_task:
                _document_task(document["paths"], api.route, operation, schemas)
        guarded = next((options["paths"] for middleware, options in self.middlewares if middleware is RequestGuard),
                       Paths())
        _document_rate_limits(document["paths"], guarded)
        referenced = _referenced(document["paths"], schemas)
        document["components"]["schemas"] = {name: schemas[name] for name in sorted(referenced)}
        return OpenAPISpecification(
            openapi=document["openapi"], info=spec.info, servers=document["servers"], tags=spec.tags,
            components=document["components"],
            paths={path: PathItem(**item) for path, item in document["paths"].items()})


def _document_task(paths: dict[str, Any], route: str, api: dict[str, Any], schemas: dict[str, Any]) -> None:
    """The task routes of the API ``api`` (documented above): its body for ``/submit``, its answer for
    ``/get``, the true status schema, an operation id each, and BentoML's ``{"error"}`` refusals."""
    schemas[TASK_STATUS] = TypeAdapter(TaskStatus).json_schema()
    status = {"description": "the task's state", "content": {"application/json": {
        "schema": {"$ref": REF_TEMPLATE.format(model=TASK_STATUS)}}}}
    errors = {str(code): error for code, error in error_responses(False, InvalidInputBody, FlatErrorBody).items()}
    for step, method in TASK_STEPS.items():
        operation = paths[f"{route}/{step}"][method]
        operation["operationId"] = f"{api['operationId']}_{step}"
        operation["responses"] = {"200": api["responses"]["200"] if step == "get" else status, **errors}
        if step == "submit":
            operation["requestBody"] = api["requestBody"]


def _document_rate_limits(paths: dict[str, Any], guarded: Paths) -> None:
    """The 429 of every inference operation, in the shape of its other refusals, with ``Retry-After``."""
    inference = re.compile("|".join(guarded.inference) or "(?!)").fullmatch
    for path, item in paths.items():
        if not inference(PATH_PARAMETER.sub("x", path)):
            continue
        for operation in item.values():
            operation["responses"][RATE_LIMITED] = {
                "description": "over the caller's rate limit (API keys or rate limits on: docs/security.md)",
                "content": operation["responses"]["4XX"]["content"],
                "headers": {"Retry-After": {"description": "whole seconds until a request is admitted again",
                                            "required": True, "schema": {"type": "integer"}}}}


def _component_schema(model: Any, schemas: dict[str, Any]) -> dict[str, Any]:
    """``model``'s JSON schema as JSON (serialization mode: BentoML's file and array types as JSON
    Schema types), its definitions added to ``schemas``."""
    schema = model.model_json_schema(ref_template=REF_TEMPLATE, mode="serialization")
    schemas.update(schema.pop("$defs", {}))
    schema.pop("root_input", None)  # BentoML's marker for its client, not JSON Schema
    return schema


def _referenced(paths: dict[str, Any], schemas: dict[str, Any]) -> set[str]:
    """The component schemas the paths use, directly or through other components."""
    found: set[str] = set()
    pending = set(SCHEMA_REF.findall(json.dumps(paths)))
    while pending:
        name = pending.pop()
        found.add(name)
        pending |= set(SCHEMA_REF.findall(json.dumps(schemas[name]))) - found
    return found
