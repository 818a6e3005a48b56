"""Issue: a new model version without a restart, under a steady load from another process.

A new wine version is trained and exported (``bentoml models export``) inside the test, imported
and loaded through the API, added to the wine experiment at weight 0, ramped to 1 in 10 and then to
all traffic, and the old version unloaded, while ``tests/steady_load.py`` sends 200 requests a second
from a process of its own. Nothing may fail, the new version must serve in both workers, its answers
must be scikit-learn's own, and the unload must give the memory back.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from collections.abc import Iterator

import bentoml
import httpx
import numpy as np
import pytest
from bentoml._internal.models import ModelStore

from common import datasets
from tests.degraded import store_wine
from tests.e2e.conftest import ADMIN_TOKEN, ROOT, TOKENS, Server, server_env

pytestmark = pytest.mark.slow
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
RATE, SECONDS = 200, 30
READY_WITHIN_S = 10.0
"""A new model is ready in every worker within this long of the load call (docs/repository.md)."""


@pytest.fixture(scope="module")
def imports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("imports")


@pytest.fixture(scope="module")
def server(model_store: Path, imports: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("live_models")
    running = Server("service:Bundle", ROOT, server_env(model_store, folder / "config.yaml", **TOKENS,
                                                        BUNDLE_IMPORT_DIR=str(imports)), folder)
    yield running
    running.stop()


def workers_rss(server: Server) -> int:
    """Resident memory of the server's processes (the workers hold the models)."""
    return server.memory()["rss"]


def wait_ready_everywhere(client: httpx.Client, tag: str) -> None:
    """Until every worker reports ``tag`` ready."""
    started = time.monotonic()
    while time.monotonic() - started < READY_WITHIN_S * 3:
        workers = client.get("/admin/models", headers=ADMIN).json()["workers"]
        states = [w.get(tag, {}).get("state") for w in workers.values()]
        if len(states) == 2 and all(s == "ready" for s in states):
            return
        time.sleep(0.1)
    raise AssertionError(f"{tag} not ready in both workers: {workers}")


def test_a_new_version_is_imported_ramped_and_the_old_one_unloaded_under_load(server: Server, imports: Path,
                                                                             tmp_path: Path) -> None:
    tag = f"wine_sklearn:v3{uuid.uuid4().hex[:8]}"
    _, pipeline = store_wine(tag, tmp_path / "models", c=0.3)
    exported = imports / "wine-v3.bentomodel"
    bentoml.models.export_model(tag, str(exported), _model_store=ModelStore(tmp_path / "models"))

    out = tmp_path / "answers.jsonl"
    client = httpx.Client(base_url=server.url, timeout=60)
    rss_before = workers_rss(server)
    load = subprocess.Popen([sys.executable, "-m", "tests.steady_load", server.url, str(RATE), str(SECONDS),
                             str(out)], cwd=ROOT)
    try:
        time.sleep(3)
        asked = time.monotonic()
        imported = client.post("/admin/models/import", json={"path": str(exported)}, headers=ADMIN)
        assert imported.status_code == 200, imported.text
        wait_ready_everywhere(client, tag)
        ready_s = time.monotonic() - asked
        added = client.post("/experiments/wine/variants", json={"name": "sklearn-v3", "model": tag}, headers=ADMIN)
        assert added.status_code == 200, added.text
        names = [v["name"] for v in added.json()["variants"]]
        assert names[-1] == "sklearn-v3" and added.json()["variants"][-1]["weight"] == 0
        tenth = {name: 4.5 for name in names[:-1]} | {"sklearn-v3": 1}
        assert client.put("/experiments/wine", json={"weights": tenth}, headers=ADMIN).status_code == 200
        time.sleep(8)
        everything = {name: 0 for name in names[:-1]} | {"sklearn-v3": 1}
        assert client.put("/experiments/wine", json={"weights": everything}, headers=ADMIN).status_code == 200
        time.sleep(8)
        old = "wine_sklearn:v1"
        unloaded = client.post(f"/v2/repository/models/{old}/unload", headers=ADMIN)
        assert unloaded.status_code == 200, unloaded.text
        assert load.wait(timeout=SECONDS + 60) == 0
    finally:
        load.kill()
    time.sleep(2)
    rss_after_unload = workers_rss(server)
    print(f"imported and ready in both workers {ready_s:.2f} s after the call; workers' RSS {rss_before / 2**20:.0f} MiB before the "
          f"import, {rss_after_unload / 2**20:.0f} MiB after the unload")

    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(answers) == RATE * SECONDS
    failed = [a for a in answers if a["status"] != 200]
    assert not failed, failed[:5]
    assert ready_s < READY_WITHIN_S

    new = [a for a in answers if a["model_tag"] == tag]
    assert len(new) > RATE * 5  # the last ~16 s were its share: 1 in 10, then all
    assert len({a["prediction_id"][:12] for a in new}) == 2, "the new version served in one worker only"
    rows = datasets.load("wine").x_test
    expected = pipeline.predict_proba(rows[[a["row"] for a in new]])
    assert np.allclose([a["probabilities"] for a in new], expected, atol=1e-6)
    assert answers[-1]["model_tag"] == tag

    states = client.get("/admin/models", headers=ADMIN).json()["workers"]
    assert all(w.get(old, {}).get("state") in (None, "unloaded") for w in states.values()), states
    assert rss_after_unload <= rss_before * 1.10
