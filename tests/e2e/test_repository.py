"""Issue 14 part B: the live model repository. Triton's client loads, checks and unloads stored models
on a real ``bentoml serve`` while it serves; every refusal is a clear 4xx naming why, with nothing
changed; a ``bentoml models export``ed model is imported from the import directory and loaded; an
unload gives the workers' memory back.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bentoml
import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from common import datasets, store
from harness.server import ServerProcess
from tests import ROOT
from tests.e2e.conftest import ADMIN_TOKEN, TOKENS, server_env
from training import wine

pytestmark = pytest.mark.slow
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SPARE = "digits_torch:v2"
"""A stored model config.yaml does not serve: loaded and unloaded by the round trip."""
ROUTED = "wine_sklearn:v1"
"""A variant of config.yaml's wine experiment with weight 1."""


@pytest.fixture(scope="module")
def import_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("imports")


@pytest.fixture(scope="module")
def server(model_store: Path, import_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("repository")
    env = server_env(model_store, folder / "config.yaml", **TOKENS, BUNDLE_IMPORT_DIR=str(import_dir))
    running = ServerProcess("service:Bundle", ROOT, env, folder)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def triton_client(server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=60)
    yield c
    c.close()


@pytest.fixture(scope="module")
def saved() -> Iterator[list[str]]:
    """Tags this module stores (in the shared test store, so unique): removed at the end."""
    tags: list[str] = []
    yield tags
    for tag in tags:
        if store.exists(tag):
            bentoml.models.delete(tag)


def save_wine(tag: str, test_probs: np.ndarray | None = None) -> bentoml.Model:
    """A wine model stored like ``python -m training`` stores one; ``test_probs`` replaces the
    probabilities it gave on the test split (a model that cannot pass its check)."""
    data = datasets.load("wine")
    trained = wine.train(data, "v1")
    probs = trained.predict_proba(data.x_test)
    return store.save(tag, labels={"framework": "sklearn", "runtime": "sklearn", "task": "classification",
                                   "family": "wine", "version": tag.partition(":")[2], "precision": "fp32"},
                      metadata={"input_shape": data.input_shape, "classes": data.classes, "dtype": "float32",
                                "feature_names": data.feature_names, "format": trained.format},
                      write=trained.write, test_probs=probs if test_probs is None else test_probs)


def worker_rss(server: ServerProcess) -> int:
    return sum(p.memory_info().rss for p in server.processes()[1:])


def index(client: httpx.Client) -> dict[str, dict[str, Any]]:
    answer = client.post("/v2/repository/index")
    assert answer.status_code == 200, answer.text
    return {entry["name"]: entry for entry in answer.json()}


def snapshot(client: httpx.Client) -> tuple[dict[str, str], dict[str, Any]]:
    """What a refusal must leave as it was: every model's state and the worker's readiness report."""
    ready = client.get("/readyz").json()
    return {name: e["state"] for name, e in index(client).items()}, {k: ready[k] for k in ("ready", "degraded")}


def test_triton_client_loads_checks_and_unloads_a_model(triton_client: triton.InferenceServerClient,
                                                        server: ServerProcess, client: httpx.Client) -> None:
    listed = {m["name"]: m for m in triton_client.get_model_repository_index()}
    assert listed[ROUTED]["state"] == "READY" and listed[SPARE]["state"] == "UNAVAILABLE"
    assert not triton_client.is_model_ready(SPARE)
    rss_before = worker_rss(server)

    started = time.perf_counter()
    triton_client.load_model(SPARE, headers=ADMIN)
    load_s = time.perf_counter() - started
    assert triton_client.is_model_ready(SPARE)
    assert {m["name"]: m["state"] for m in triton_client.get_model_repository_index()}[SPARE] == "READY"
    workers = client.get("/admin/models").json()["workers"]
    assert len(workers) == 2 and all(models[SPARE]["state"] == "ready" for models in workers.values())
    rss_loaded = worker_rss(server)

    started = time.perf_counter()
    triton_client.unload_model(SPARE, headers=ADMIN)
    unload_s = time.perf_counter() - started
    assert not triton_client.is_model_ready(SPARE)
    rss_after = worker_rss(server)
    workers = client.get("/admin/models").json()["workers"]
    assert all(models[SPARE]["state"] == "unloaded" for models in workers.values())
    print(f"\n{SPARE}: load {load_s:.2f} s, unload {unload_s:.2f} s; workers' RSS before load "
          f"{rss_before / 2**20:.1f} MiB, loaded {rss_loaded / 2**20:.1f} MiB, after unload {rss_after / 2**20:.1f} MiB")
    assert rss_after < rss_loaded, "an unload gives memory back"


def test_a_model_that_fails_its_parity_check_is_refused_and_nothing_changes(client: httpx.Client,
                                                                            saved: list[str]) -> None:
    tag = f"wine_sklearn:v9{secrets.token_hex(4)}"
    saved.append(tag)
    other = store.stored_test_probs(store.get("wine_sklearn:v2"))
    save_wine(tag, test_probs=other)
    before = snapshot(client)
    answer = client.post(f"/v2/repository/models/{tag}/load", headers=ADMIN)
    assert answer.status_code == 400, answer.text
    assert "stored test probabilities" in answer.json()["error"] and "fp32 gate" in answer.json()["error"]
    assert snapshot(client) == before
    assert "refused" in index(client)[tag]["reason"]
    assert client.get(f"/v2/models/{tag}/ready").status_code == 503


@pytest.mark.parametrize(("call", "status", "named"), [
    (("post", "/v2/repository/models/nope_model:v1/load"), 404, "not in the model store"),
    (("post", f"/v2/repository/models/{ROUTED}/unload"), 409, "still takes traffic as wine/sklearn-v1"),
    (("post", "/admin/models/import", {"path": "/etc/passwd"}), 403, "outside the import directory"),
    (("post", "/admin/models/import", {"path": "../escape.bentomodel"}), 403, "outside the import directory"),
])
def test_refusals_name_the_reason_and_change_nothing(client: httpx.Client, call: tuple[Any, ...], status: int,
                                                     named: str) -> None:
    before = snapshot(client)
    method, path, *body = call
    answer = client.request(method, path, headers=ADMIN, json=body[0] if body else None)
    assert answer.status_code == status, answer.text
    assert named in answer.json()["error"]
    assert snapshot(client) == before
    assert client.get(f"/v2/models/{ROUTED}/ready").status_code == 200


def test_a_corrupted_archive_is_refused(client: httpx.Client, import_dir: Path, saved: list[str]) -> None:
    tag = f"wine_sklearn:v9{secrets.token_hex(4)}"
    saved.append(tag)
    save_wine(tag)
    archive = Path(bentoml.models.export_model(tag, str(import_dir / "whole.bentomodel")))
    bentoml.models.delete(tag)
    (import_dir / "cut.bentomodel").write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    before = snapshot(client)
    answer = client.post("/admin/models/import", headers=ADMIN, json={"path": "cut.bentomodel"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["field"] == "path" and "not a readable .bentomodel" in answer.json()["error"]
    assert snapshot(client) == before and not store.exists(tag)


def test_state_changes_need_the_admin_token(client: httpx.Client) -> None:
    for path in (f"/v2/repository/models/{SPARE}/load", f"/v2/repository/models/{SPARE}/unload",
                 "/admin/models/import"):
        assert client.post(path, json={}).status_code == 401


def test_an_exported_model_is_imported_and_loaded(client: httpx.Client, import_dir: Path,
                                                  triton_client: triton.InferenceServerClient,
                                                  saved: list[str]) -> None:
    tag = f"wine_sklearn:v9{secrets.token_hex(4)}"
    saved.append(tag)
    save_wine(tag)
    bentoml.models.export_model(tag, str(import_dir / "exported.bentomodel"))
    bentoml.models.delete(tag)
    answer = client.post("/admin/models/import", headers=ADMIN, json={"path": "exported.bentomodel"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["name"] == tag and answer.json()["load"]["state"] == "READY"
    assert triton_client.is_model_ready(tag) and store.exists(tag)
    again = client.post("/admin/models/import", headers=ADMIN, json={"path": "exported.bentomodel"})
    assert again.status_code == 409 and "already exists" in again.json()["error"]
    triton_client.unload_model(tag, headers=ADMIN)
    with pytest.raises(InferenceServerException):
        triton_client.load_model("nope_model:v1", headers=ADMIN)
