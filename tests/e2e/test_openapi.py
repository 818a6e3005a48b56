"""Issue 19, items 1 and 2, against the session's real ``bentoml serve``: the OpenAPI document the
service serves (``/docs.json``) validates and describes every route truthfully, and every protected
route refuses a caller without its token before it reads the body.

The routes come from the service itself (``service.app`` and its BentoML APIs), so routes added later
are covered without editing this file: a protected route is one with an ``auth.Bearer`` dependency.
"""

from __future__ import annotations

import http.client
import re
from collections.abc import Iterator
from itertools import product
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from openapi_spec_validator import validate
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, ignored_auth,
                                               negative_data_rejection, response_headers_conformance,
                                               response_schema_conformance, status_code_conformance)

from protocols.auth import Bearer
from tests.e2e.conftest import TOKENS, Server
from tests.strategies import CONFIG, MODELS, PHASES, REQUEST_TIMEOUT_S, SCHEMATHESIS_EXAMPLES

SEED = 19
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection, ignored_auth]
FORM = "multipart/form-data"
"""Form fields are strings on the wire: a negated type (an empty array for a string field) can arrive as
a valid form, so negative data is not expected to be rejected there."""
UNSERVED_MODEL = "no-such-model"
"""Protected routes change live state: fuzzed with a model that is not served, they stop at its 404
once the token and the body have passed."""
NESTING = 10_000
HOSTILE_BODIES = {
    "invalid JSON": b'{"weights": {',
    "empty": b"",
    "wrong type": b'[1, "two", null, {"three": 3}]',
    "deep nesting": b"[" * NESTING + b"]" * NESTING,
    "huge string": b'"' + b"x" * 1_000_000 + b'"',
}
"""Bodies no route accepts, whatever its schema: refused with a 400 naming the field, once the token
has passed, and never reaching a parser without it."""
HOSTILE_HEADERS = {
    "wrong Content-Type": {"Content-Type": "text/plain"},
    "oversized Content-Length": {"Content-Type": "application/json", "Content-Length": str(10**12)},
}
"""Headers that earn a 415 or a 413 once the token has passed; without it, a 401/403 and nothing read."""
PATH_PARAMETER = re.compile(r"\{(\w+)\}")
INFERENCE = ["/predict", "/predict_ndarray", "/classify_image", "/v2/models/{model}/infer",
             "/v2/models/{model}/versions/{version}/infer", "/v1/models/{model}:predict"]


@pytest.fixture(scope="module")
def app(model_store: Any) -> Any:
    """The service's FastAPI app, imported once the model store is known (the catalogue reads it)."""
    import service

    return service


@pytest.fixture(scope="module")
def document(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/docs.json")
    assert response.status_code == 200, response.text
    return response.json()


def api_routes(service: Any) -> Iterator[RouteContext]:
    """The FastAPI app's routes as served (included routers resolved)."""
    routes = iter_route_contexts(service.app.routes)
    return (route for route in routes if isinstance(route.original_route, APIRoute))


def protected_routes(service: Any) -> Iterator[tuple[RouteContext, Bearer]]:
    for route in api_routes(service):
        for dependency in route.dependant.dependencies:
            if isinstance(dependency.call, Bearer):
                yield route, dependency.call


def served_path(path: str) -> str:
    """``path`` with each parameter naming a served model (or its first variant)."""
    model = MODELS[0]
    variant = CONFIG.experiments[model].variants[0].name
    return PATH_PARAMETER.sub(lambda m: model if m.group(1) == "model" else variant, path)


def test_the_document_validates(document: dict[str, Any]) -> None:
    validate(document)  # raises, naming the first fault


def test_every_route_is_in_the_document_with_its_errors(app: Any, document: dict[str, Any]) -> None:
    routes = {(api.route, "post") for api in app.Bundle.apis.values()}
    routes |= {(route.path, method.lower()) for route in api_routes(app) for method in route.methods}
    assert len(routes) > len(app.Bundle.apis)
    for path, method in sorted(routes):
        operation = document["paths"].get(path, {}).get(method)
        assert operation is not None, f"{method.upper()} {path} is not in the document"
        responses = operation["responses"]
        assert "4XX" in responses and "503" in responses, f"{method.upper()} {path}: {sorted(responses)}"
        assert "Retry-After" in responses["503"]["headers"]
        if PATH_PARAMETER.search(path):
            declared = {p["name"] for p in operation["parameters"] if p["in"] == "path"}
            assert declared == set(PATH_PARAMETER.findall(path)), f"{method.upper()} {path}: {declared}"


def test_inference_routes_document_429_with_retry_after(document: dict[str, Any]) -> None:
    for path in INFERENCE:
        limited = document["paths"][path]["post"]["responses"]["429"]
        assert limited["headers"]["Retry-After"] == {**limited["headers"]["Retry-After"], "required": True,
                                                     "schema": {"type": "integer"}}, path
        assert limited["content"] == document["paths"][path]["post"]["responses"]["4XX"]["content"], path
    assert "429" not in document["paths"]["/experiments/{model}"]["put"]["responses"]


def test_native_errors_are_documented_in_the_native_shape(document: dict[str, Any]) -> None:
    for path in ("/predict", "/classify_image", "/experiments/{model}"):
        [operation] = document["paths"][path].values()
        schema = operation["responses"]["4XX"]["content"]["application/json"]["schema"]
        assert any({"error", "field", "expected"} <= set(shape["properties"]) and "field" in shape["required"]
                   for shape in schema.get("anyOf", [schema])), schema


def test_the_image_the_binary_extension_and_the_admin_change_are_described(document: dict[str, Any]) -> None:
    image = document["paths"]["/classify_image"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert image["schema"]["properties"]["image"] == {**image["schema"]["properties"]["image"],
                                                      "type": "string", "format": "binary"}
    infer = document["paths"]["/v2/models/{model}/versions/{version}/infer"]["post"]
    assert {"application/json", "application/octet-stream"} <= set(infer["requestBody"]["content"])
    assert "Inference-Header-Content-Length" in {p["name"] for p in infer["parameters"]}
    assert "application/octet-stream" in infer["responses"]["200"]["content"]
    change = document["paths"]["/experiments/{model}"]["put"]
    assert change["security"] == [{"admin": []}]
    assert document["components"]["securitySchemes"]["admin"] == {
        **document["components"]["securitySchemes"]["admin"], "type": "http", "scheme": "bearer"}
    body = change["requestBody"]["content"]["application/json"]["schema"]
    assert {"weights", "shadow"} <= set(body["properties"])
    assert not any(p["in"] == "header" for p in change.get("parameters", []))


def test_protected_routes_refuse_before_reading_the_body(app: Any, server: Server, client: httpx.Client) -> None:
    """Without a token, or with a wrong one, every hostile body, content type or Content-Length gets
    401/403 (never 400/413/415/422, which would show what the route takes); with the right token the
    same body gets a 400 that names the field, and the same headers their 415 or 413."""
    protected = list(protected_routes(app))
    assert {route.path for route, _ in protected} >= {"/experiments/{model}"}
    failures = []
    for route, bearer in protected:
        path = served_path(route.path)
        token = TOKENS[bearer.env]
        refused = [None, "Bearer wrong", f"Basic {token}", token]
        right = [f"Bearer {token}"] if "requestBody" in (route.openapi_extra or {}) else []
        for method, (name, body), credentials in product(route.methods, HOSTILE_BODIES.items(),
                                                         refused + right):
            headers = {"Content-Type": "application/json"}
            if credentials:
                headers["Authorization"] = credentials
            answer = client.request(method, path, content=body, headers=headers)
            # With the token, a body is read and refused by name, or the resource it names is missing
            # (a pause without a rollout). OIP-shaped routes name the field first in their message.
            status, fields = ({400, 404}, {"body", "model", "name"}) if credentials in right else ({401, 403},
                                                                                         {"Authorization"})
            error = answer.json()
            if answer.status_code not in status or error.get("field", error["error"].split(":")[0]) not in fields:
                failures.append(f"{method} {path} {name} with {credentials!r}: "
                                f"{answer.status_code} {answer.text[:200]}")
    for route, bearer in protected:
        path = served_path(route.path)
        token = TOKENS[bearer.env]
        right = [f"Bearer {token}"] if "requestBody" in (route.openapi_extra or {}) else []
        for method, (name, headers), credentials in product(route.methods, HOSTILE_HEADERS.items(),
                                                            [None, "Bearer wrong", *right]):
            sent = {**headers, **({"Authorization": credentials} if credentials else {})}
            status, text = raw_request(server, method, path, sent)
            # With the token: the header's refusal, or the missing resource the path names (a route of any
            # content type, such as the repository's, reads its body after looking the model up).
            expected = {404, 413, 415} if credentials in right else {401, 403}
            if status not in expected:
                failures.append(f"{method} {path} {name} with {credentials!r}: {status} {text[:200]}")
    assert not failures, "\n".join(failures)


def raw_request(server: Server, method: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
    """``method path`` with exactly ``headers`` and a short body: its Content-Length may promise more
    (which httpx refuses to send), so the answer must come before the body is read."""
    body = b'{"weights": {}}'
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_TIMEOUT_S)
    try:
        connection.request(method, path, body=body, headers={"Content-Length": str(len(body)), **headers})
        answer = connection.getresponse()
        return answer.status, answer.read().decode(errors="replace")
    finally:
        connection.close()


def real_path_parameters(names: set[str]) -> st.SearchStrategy[dict[str, str]]:
    """Path parameters naming served models and their versions: variant names, model tag versions
    (``v2``, ``2``) and a wrong one, so requests get past the 404 to the handlers behind it."""

    def versions(model: str) -> list[str]:
        variants = CONFIG.experiments[model].variants
        tags = [v.model.partition(":")[2] for v in variants]
        return [*(v.name for v in variants), *tags, *(t.lstrip("v") for t in tags), "v999"]

    return st.sampled_from(MODELS).flatmap(lambda model: st.fixed_dictionaries(
        {name: st.just(model) if name == "model" else st.sampled_from(versions(model)) for name in names}))


def fuzz(strategy: st.SearchStrategy[schemathesis.Case], url: str, headers: dict[str, str],
         checks: list[Any]) -> None:
    """Sends ``strategy``'s cases with ``headers`` (a token: then never to a served model) and checks
    each answer against the document."""

    @seed(SEED)
    @settings(max_examples=SCHEMATHESIS_EXAMPLES, deadline=None, database=None, print_blob=True,
              phases=PHASES, suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case: schemathesis.Case) -> None:
        if headers:
            assert (case.path_parameters or {}).get("model") not in MODELS
        response = case.call(base_url=url, headers=headers, timeout=REQUEST_TIMEOUT_S)
        case.validate_response(response, checks=checks, headers=headers)

    run()


def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_document(
        app: Any, server: Server, document: dict[str, Any]) -> None:
    """Every operation of ``/docs.json``, positive and (with a body or parameters) negative data, a
    fixed seed and a bounded number of examples: no 5xx, and every answer's status, content type,
    headers and body as documented, and no worker dies. Protected operations get their token and a
    model that is not served (they change live state); the others get served models and versions as
    well as generated ones."""
    processes = {p.pid for p in server.processes()}
    tokens = {route.path: TOKENS[bearer.env] for route, bearer in protected_routes(app)}
    schema = schemathesis.openapi.from_dict(document)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {"/predict", "/predict_ndarray", "/classify_image", *tokens} <= {op.path for op in operations}
    failures: list[str] = []
    for operation in operations:
        names = set(PATH_PARAMETER.findall(operation.path))
        token = tokens.get(operation.path)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        described = document["paths"][operation.path][operation.method.lower()]
        form = FORM in described.get("requestBody", {}).get("content", {})
        checks = [check for check in CHECKS if not (form and check is negative_data_rejection)]
        modes = [GenerationMode.POSITIVE]
        if "requestBody" in described or described.get("parameters"):
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            if token and names & {"model", "name"}:  # a logical model, or a stored model's tag
                strategy = operation.as_strategy(generation_mode=mode,
                                                 path_parameters={n: UNSERVED_MODEL for n in names})
            else:
                strategy = operation.as_strategy(generation_mode=mode)
                if names & {"model", "version"}:
                    strategy = st.one_of(real_path_parameters(names).flatmap(
                        lambda fixed, mode=mode, operation=operation: operation.as_strategy(
                            generation_mode=mode, path_parameters=fixed)), strategy)
            try:
                fuzz(strategy, server.url, headers, checks)
            except Unsatisfiable:
                pass  # no invalid request exists for this operation
            except (Exception, BaseExceptionGroup) as err:  # noqa: BLE001 - collect all, then report all
                failures.append(f"{operation.label} [{mode.value}]: {err}")
    assert not failures, f"{len(failures)} failing operation(s):\n\n" + "\n\n".join(failures)
    assert {p.pid for p in server.processes()} == processes, "a server process died during the fuzzing"
