"""Issue: the service. Real HTTP against one ``bentoml serve`` of service.py per test session."""

from __future__ import annotations

import asyncio
import io
import re
import socket
import time
import uuid

import httpx
import numpy as np
import pytest
from PIL import Image

from common import config, datasets, store
from tests.e2e.conftest import FEEDBACK_TOKEN
from tests.e2e.test_decisions import wait_logged

CONFIG = config.load()


def offline_labels(model_tag: str, family: str) -> list[str]:
    """What the stored model predicted on the test split when it was stored."""
    classes = datasets.load(family).classes
    return [classes[i] for i in store.stored_test_probs(store.get(model_tag)).argmax(1)]


@pytest.mark.parametrize("family", sorted(CONFIG.experiments))
def test_predict_json_matches_offline_predictions(client: httpx.Client, family: str) -> None:
    data = datasets.load(family)
    rows = data.x_test[:40]
    body = {"instances": [{"model": family, "inputs": r.tolist(), "user_id": f"user-{i}"}
                          for i, r in enumerate(rows)]}
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    answers = response.json()
    assert len(answers) == len(rows)
    expected = {v.model: offline_labels(v.model, family) for v in CONFIG.experiments[family].variants}
    for i, answer in enumerate(answers):
        assert answer["model"] == family
        assert answer["model_tag"] in expected
        assert answer["variant"] == CONFIG.experiments[family].variant(answer["variant"]).name
        assert answer["label"] == expected[answer["model_tag"]][i]
        assert len(answer["probabilities"]) == len(data.classes)
        assert sum(answer["probabilities"]) == pytest.approx(1.0, abs=1e-4)
    assert len({a["variant"] for a in answers}) == 2, "40 users should reach both variants"


@pytest.mark.parametrize("family", sorted(CONFIG.experiments))
def test_predict_ndarray_pinned_variant_matches_offline(client: httpx.Client, family: str) -> None:
    data = datasets.load(family)
    for variant in CONFIG.experiments[family].variants:
        response = client.post("/predict_ndarray", json={
            "model": family, "inputs": data.x_test.tolist(), "variant": variant.name})
        assert response.status_code == 200, response.text
        answer = response.json()
        assert response.headers["X-Variant"] == variant.name
        assert answer["pinned"] is True
        assert answer["model_tag"] == variant.model
        assert answer["labels"] == offline_labels(variant.model, family)
        # Dynamic INT8 quantizes activations with a scale taken over the whole batch, so its
        # probabilities move a little with the batch a row shares; labels must not.
        precision = store.get(variant.model).info.labels["precision"]
        np.testing.assert_allclose(answer["probabilities"], store.stored_test_probs(store.get(variant.model)),
                                   atol=1e-5 if precision == "fp32" else 0.1)


def digit_png(pixels: np.ndarray, dark_ink: bool, size: int = 96) -> bytes:
    grey = (pixels / 16 * 255).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(255 - grey if dark_ink else grey).resize((size, size), Image.NEAREST)
    buffer = io.BytesIO()
    image.convert("RGB" if dark_ink else "L").save(buffer, format="PNG")
    return buffer.getvalue()


def test_classify_image_png_of_test_digits(client: httpx.Client) -> None:
    data = datasets.load("digits")
    prediction_ids = set()
    for i in range(12):
        png = digit_png(data.x_test[i], dark_ink=i % 2 == 0)
        response = client.post("/classify_image", files={"image": ("digit.png", png, "image/png")},
                               data={"user_id": "carol"})
        assert response.status_code == 200, response.text
        assert response.json()["label"] == str(data.y_test[i])
        assert response.headers["X-Variant"] == response.json()["variant"]
        assert response.headers["X-Prediction-Id"] == response.json()["prediction_id"]
        prediction_ids.add(response.json()["prediction_id"])
    assert len(prediction_ids) == 12, "every answer has an id of its own"


def test_classify_image_jpeg(client: httpx.Client) -> None:
    data = datasets.load("digits")
    image = Image.open(io.BytesIO(digit_png(data.x_test[3], dark_ink=True, size=200)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    response = client.post("/classify_image", files={"image": ("d.jpg", buffer.getvalue(), "image/jpeg")})
    assert response.status_code == 200, response.text
    assert response.json()["label"] == str(data.y_test[3])


def test_client_ids_are_echoed_and_take_feedback(client: httpx.Client) -> None:
    """A client's own ``id`` per /predict instance, and on /classify_image, comes back in the answer
    and names the prediction in /feedback instead of its ``prediction_id``."""
    order = uuid.uuid4().hex[:8]
    wine, digits = datasets.load("wine"), datasets.load("digits")
    instances = [{"model": "wine", "inputs": row.tolist(), "id": f"order-{order}-{i}"}
                 for i, row in enumerate(wine.x_test[:3])]
    answers = client.post("/predict", json={"instances": instances}).json()
    assert [a["id"] for a in answers] == [i["id"] for i in instances]
    png = digit_png(digits.x_test[0], dark_ink=True)
    image = client.post("/classify_image", data={"id": f"scan-{order}"},
                        files={"image": ("digit.png", png, "image/png")})
    assert image.status_code == 200, image.text
    answers.append(image.json())
    assert answers[-1]["id"] == f"scan-{order}"
    assert image.headers["X-Prediction-Id"] == answers[-1]["prediction_id"]
    assert len({a["prediction_id"] for a in answers}) == 4

    wait_logged(client, [a["prediction_id"] for a in answers])
    posted = client.post("/feedback", headers={"Authorization": f"Bearer {FEEDBACK_TOKEN}"},
                         json={"feedback": [{"id": a["id"], "label": a["label"]} for a in answers]})
    assert posted.status_code == 200, posted.text
    assert [(r["status"], r["id"], r["prediction_id"]) for r in posted.json()["results"]] == [
        ("matched", a["id"], a["prediction_id"]) for a in answers]


def test_models_catalogue(client: httpx.Client) -> None:
    catalogue = client.get("/models").json()
    assert set(catalogue) == set(CONFIG.experiments)
    for family, entry in catalogue.items():
        assert entry["input"]["classes"] == datasets.load(family).classes
        experiment = CONFIG.experiments[family]
        tags = [v["model_tag"] for v in entry["variants"] if not v["shadow"]]
        assert tags == [v.model for v in experiment.variants]
        shadows = [v["model_tag"] for v in entry["variants"] if v["shadow"]]
        assert shadows == ([experiment.shadow.model] if experiment.shadow else [])
        for variant in entry["variants"]:
            assert variant["labels"]["family"] == family
            if variant["labels"].get("twin_of"):
                assert "agreement" in variant["metadata"]
            else:
                assert variant["metadata"]["metrics"]["accuracy"] > 0.9


def test_bentoml_endpoints_stay_available(client: httpx.Client) -> None:
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert "bentoml_service_request_total" in client.get("/metrics").text
    spec = client.get("/docs.json").json()
    assert {"/predict", "/predict_ndarray", "/classify_image"} <= set(spec["paths"])


def histogram_mean(metrics: str, name: str, **labels: str) -> float:
    """Mean of a Prometheus histogram, summed over series whose labels match."""
    total = count = 0.0
    for line in metrics.splitlines():
        match = re.match(rf"{name}_(sum|count)\{{(.*)\}} (\S+)", line)
        if match and all(f'{k}="{v}"' in match.group(2) for k, v in labels.items()):
            if match.group(1) == "sum":
                total += float(match.group(3))
            else:
                count += float(match.group(3))
    return total / count if count else 0.0


async def _concurrent(url: str, path: str, bodies: list[dict], concurrency: int = 32) -> list[int]:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60) as session:

        async def post(body: dict) -> int:
            async with gate:
                return (await session.post(path, json=body)).status_code

        return await asyncio.gather(*(post(b) for b in bodies))


def test_adaptive_batching_under_concurrent_load(server, client: httpx.Client) -> None:
    rows = datasets.load("wine").x_test
    singles = [{"instances": [{"model": "wine", "inputs": rows[i % len(rows)].tolist()}]} for i in range(600)]
    assert set(asyncio.run(_concurrent(server.url, "/predict", singles))) == {200}
    metrics = client.get("/metrics").text
    assert histogram_mean(metrics, "bundle_batch_rows", model_tag="wine_sklearn_onnx:v2") > 1  # /predict only
    arrays = [{"model": "wine", "inputs": [rows[i % len(rows)].tolist()], "variant": "sklearn-v1"}
              for i in range(600)]
    assert set(asyncio.run(_concurrent(server.url, "/predict_ndarray", arrays))) == {200}
    metrics = client.get("/metrics").text
    assert histogram_mean(metrics, "bundle_batch_rows", model_tag="wine_sklearn:v1") > 1


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [
        ("/predict_ndarray", {"model": "wine", "inputs": [[1.0, 2.0]]}, 400, "inputs"),
        ("/predict_ndarray", {"model": "wine", "inputs": "many"}, 400, "inputs"),
        ("/predict_ndarray", {"model": "nope", "inputs": [[1.0]]}, 404, "model"),
        ("/predict_ndarray", {"model": "wine", "inputs": [[0.0] * 13], "variant": "x"}, 404, "variant"),
        ("/predict_ndarray", {"model": "wine"}, 400, "inputs"),
        ("/predict", {"instances": [{"model": "wine", "inputs": [1.0, 2.0]}]}, 400, "inputs"),
        ("/predict", {"instances": [{"model": "nope", "inputs": [1.0]}]}, 400, "model"),
        ("/predict", {"instances": [{"model": "wine", "inputs": ["a"] * 13}]}, 400, "inputs"),
    ],
)
def test_bad_input_gets_4xx_naming_the_problem(client: httpx.Client, path: str, body: dict,
                                               status: int, field: str) -> None:
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert field in response.text
    assert "Traceback" not in response.text


@pytest.mark.parametrize(
    ("content", "status"),
    [(b"not an image at all", 415), (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, 415)],
)
def test_non_images_get_4xx(client: httpx.Client, content: bytes, status: int) -> None:
    response = client.post("/classify_image", files={"image": ("x.png", content, "image/png")})
    assert response.status_code == status, response.text
    assert response.json()["field"] == "image"


def test_server_keeps_serving_after_bad_input(client: httpx.Client) -> None:
    nan_row = "[" + ",".join(["NaN"] * 13) + "]"
    for path, body in (("/predict_ndarray", f'{{"model": "wine", "inputs": [{nan_row}]}}'),
                       ("/predict", f'{{"instances": [{{"model": "wine", "inputs": {nan_row}}}]}}')):
        rejected = client.post(path, content=body, headers={"content-type": "application/json"})
        assert rejected.status_code == 400, rejected.text
    row = datasets.load("wine").x_test[0].tolist()
    response = client.post("/predict", json={"instances": [{"model": "wine", "inputs": row}]})
    assert response.status_code == 200


def test_one_bad_number_is_one_error_naming_it(client: httpx.Client) -> None:
    row = [*datasets.load("wine").x_test[0].tolist()[:12], "lots"]
    response = client.post("/predict", json={"instances": [{"model": "wine", "inputs": row}]})
    assert response.status_code == 400
    assert response.json()["field"] == "instances.0.inputs" and "not a numeric array" in response.json()["error"]


JSON_BODY = "Content-Type: application/json\r\n"


def hang_up_mid_body(server, path: str, headers: str = JSON_BODY) -> None:
    """Send the headers and a tenth of a promised body, then close the connection."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        connection.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}"
                           f"Content-Length: 1000\r\n\r\n".encode() + b'{"inputs": [' + b" " * 88)
        time.sleep(0.2)


@pytest.mark.parametrize(("path", "label", "headers"), [
    ("/v2/models/wine/infer", "/v2/models/*", JSON_BODY), ("/v1/models/wine:predict", "/v1/models/*", JSON_BODY),
    ("/predict", "/predict", JSON_BODY), ("/predict_ndarray", "/predict_ndarray", JSON_BODY),
    ("/classify_image", "/classify_image", "Content-Type: multipart/form-data; boundary=x\r\n"),
    ("/feedback", "/feedback", f"{JSON_BODY}Authorization: Bearer {FEEDBACK_TOKEN}\r\n")])
def test_a_client_hanging_up_is_counted_not_logged_as_an_error(server, client: httpx.Client, path: str,
                                                               label: str, headers: str) -> None:
    def disconnects() -> float:
        pattern = rf'bundle_client_disconnects_total\{{[^}}]*path="{re.escape(label)}"[^}}]*\}} (\S+)'
        return sum(float(v) for v in re.findall(pattern, client.get("/metrics").text))

    before, log_before = disconnects(), len(server.output())
    for _ in range(3):
        hang_up_mid_body(server, path, headers)
    deadline = time.monotonic() + 10
    while disconnects() - before < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert disconnects() - before == 3
    new_log = server.output()[log_before:]
    assert "ClientDisconnect" not in new_log and "Traceback" not in new_log, new_log[-2000:]
    assert client.get("/readyz").status_code == 200, "the server keeps serving"
