"""Locust load test of every endpoint with a mix of users.

    .venv/bin/locust -f locustfile.py --host http://localhost:3000            # web UI on :8089
    .venv/bin/locust -f locustfile.py --host http://localhost:3000 --headless -u 64 -r 16 -t 1m

``AppUser`` is an application calling single rows with a sticky user id (A/B stays put per user);
``BatchClient`` is a batch job sending arrays; ``ProtocolClient`` is a Triton or TF Serving client.
For figures to compare, prefer ``make bench``: Locust's Python workers need more CPU than wrk.
"""

from __future__ import annotations

import io
import random
import uuid

import numpy as np
from locust import FastHttpUser, between, task
from PIL import Image

from common.datasets import FAMILIES, load

ROWS = {family: load(family).x_test for family in FAMILIES}


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((255 - pixels / 16 * 255).astype(np.uint8)).resize((64, 64)).save(buffer, format="PNG")
    return buffer.getvalue()


DIGIT_PNGS = [_png(p) for p in ROWS["digits"][:20]]


def _row(family: str) -> list:
    rows = ROWS[family]
    return rows[random.randrange(len(rows))].tolist()


class AppUser(FastHttpUser):
    weight = 6
    wait_time = between(0.01, 0.1)

    def on_start(self) -> None:
        self.user_id = f"locust-{uuid.uuid4().hex[:12]}"

    @task(10)
    def predict(self) -> None:
        family = random.choice(FAMILIES)
        self.client.post("/predict", name=f"/predict [{family}]",
                         json={"instances": [{"model": family, "inputs": _row(family), "user_id": self.user_id}]})

    @task(3)
    def classify_image(self) -> None:
        self.client.post("/classify_image", files={"image": ("digit.png", random.choice(DIGIT_PNGS), "image/png")},
                         data={"user_id": self.user_id})

    @task(1)
    def catalogue(self) -> None:
        self.client.get("/models")
        self.client.get("/experiments")


class BatchClient(FastHttpUser):
    weight = 1
    wait_time = between(0.1, 0.5)

    @task
    def predict_ndarray(self) -> None:
        family = random.choice(FAMILIES)
        self.client.post("/predict_ndarray", name=f"/predict_ndarray [{family}]",
                         json={"model": family, "inputs": ROWS[family][:64].tolist()})


class ProtocolClient(FastHttpUser):
    weight = 2
    wait_time = between(0.01, 0.1)

    @task(2)
    def open_inference_protocol(self) -> None:
        row = _row("wine")
        self.client.post("/v2/models/wine/infer", name="/v2/models/[model]/infer",
                         json={"inputs": [{"name": "input", "shape": [1, len(row)], "datatype": "FP32", "data": row}]})

    @task(1)
    def tf_serving(self) -> None:
        self.client.post("/v1/models/cancer:predict", name="/v1/models/[model]:predict",
                         json={"instances": [_row("cancer")]})
