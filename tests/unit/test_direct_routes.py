"""Issue: performance. The direct path (``protocols/direct.py``) finds the protocols' inference routes
in the app it is given, with their path parameters. Its answers equal BentoML's path
(tests/e2e/test_direct.py), so only this test sees a route it misses: once FastAPI's included routers
hid them, and every OIP request took BentoML's path at 0.6x the speed of ``/predict``."""

from __future__ import annotations

import pytest
from fastapi import FastAPI

from protocols import control, oip, tfserving
from protocols.direct import DirectPath


@pytest.fixture(scope="module")
def direct() -> DirectPath:
    app = FastAPI()
    for protocol in (control, oip, tfserving):
        app.include_router(protocol.router)
    return DirectPath(app, app, (oip.infer, tfserving.predict))


@pytest.mark.parametrize(("path", "handler", "params"), [
    ("/v2/models/wine/infer", oip.infer, {"model": "wine"}),
    ("/v2/models/wine/versions/onnx-v2/infer", oip.infer, {"model": "wine", "version": "onnx-v2"}),
    ("/v1/models/wine:predict", tfserving.predict, {"model": "wine"}),
    ("/v1/models/wine/versions/2:predict", tfserving.predict, {"model": "wine", "version": "2"}),
])
def test_each_inference_route_is_taken_with_its_path_parameters(direct: DirectPath, path: str, handler: object,
                                                                params: dict[str, str]) -> None:
    taken = [(h, m.groupdict()) for pattern, h in direct.routes if (m := pattern.match(path))]
    assert taken == [(handler, params)]


@pytest.mark.parametrize("path", ["/v2/models/wine/ready", "/v2/models/wine", "/v1/models/wine", "/experiments",
                                  "/v2/models/wine/infer/extra", "/v2/models/a/b/infer"])
def test_other_routes_take_bentoml_path(direct: DirectPath, path: str) -> None:
    assert not [h for pattern, h in direct.routes if pattern.match(path)]
