"""Issue: the service, build and ship. ``bentoml build`` packs the service with its models and the
built Bento serves correct answers from another directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from common import config, datasets, store
from tests.e2e.conftest import ROOT, Server, server_env

pytestmark = pytest.mark.slow  # servers, databases or builds of its own


@pytest.fixture(scope="module")
def bento(model_store: Path) -> Path:
    done = subprocess.run([str(Path(sys.executable).with_name("bentoml")), "build", "--output", "tag"],
                          cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    tag = next(line.split("__tag__:")[1] for line in done.stdout.splitlines() if "__tag__:" in line)
    name, version = tag.strip().split(":")
    return model_store / "bentos" / name / version


def test_bento_declares_every_configured_model(bento: Path) -> None:
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    packed = [m["tag"] for m in info["services"][0]["models"]]
    assert sorted(packed) == sorted(config.load().model_tags())
    assert (bento / "src" / "config.yaml").read_text() == config.DEFAULT_PATH.read_text()


def test_bento_has_a_dockerfile_for_containerize(bento: Path) -> None:
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "FROM python:3.11" in dockerfile
    assert "requirements.txt" in dockerfile
    assert "EXPOSE 3000" in dockerfile
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "bentoml==1.4.39" in requirements and "onnxruntime==" in requirements


def test_built_bento_serves_from_another_directory(bento: Path, model_store: Path, tmp_path: Path) -> None:
    env = server_env(model_store, tmp_path / "unused-config.yaml")
    env = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "BUNDLE_CONFIG")}
    server = Server(f"bundle:{bento.name}", tmp_path, env, tmp_path)
    try:
        data = datasets.load("wine")
        response = httpx.post(f"{server.url}/predict_ndarray", timeout=60,
                              json={"model": "wine", "inputs": data.x_test.tolist()})
        assert response.status_code == 200, response.text
        answer = response.json()
        classes = data.classes
        expected = [classes[i] for i in store.stored_test_probs(store.get(answer["model_tag"])).argmax(1)]
        assert answer["labels"] == expected
    finally:
        server.stop()
