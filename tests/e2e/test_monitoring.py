"""Issue 16 end to end: references, input sampling, drift over REST and Prometheus, and the dashboard
in a real headless Chromium (Debian's, driven by Playwright), on one real server (2 workers).

The server's home links the test store's models (stored without references), adds a degraded wine
candidate (trained on shuffled labels, with its reference) and backfills the references of the others
(``python -m training.backfill``), which the drift checks then use. Wine traffic is replayed with its
labels, then again with ``alcohol`` scaled by 1.5. Last, a rollout of the degraded candidate is started
and aborted, and the dashboard shows it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Any
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import yaml
from bentoml._internal.models import ModelStore

from common import datasets, reference, store
from harness.server import ServerProcess as Server
from tests import ROOT
from tests.e2e.conftest import ADMIN_TOKEN, FEEDBACK_TOKEN, TOKENS
from tests.degraded import DEGRADED, degraded_home, store_wine
from tests.e2e.test_decisions import predict, wait_for, wait_logged

pytestmark = pytest.mark.slow

SHIFTED = "alcohol"
SCALE = 1.5
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FEEDBACK = {"Authorization": f"Bearer {FEEDBACK_TOKEN}"}
ARTIFACTS = Path(os.environ.get("BUNDLE_TEST_ARTIFACTS", ROOT / "test-artifacts"))
WIDTHS = {"laptop": (1366, 900), "phone": (390, 844)}


BACKFILLED = "wine_unreferenced:v1"
"""Wine's v1 pipeline stored by this module without ``reference.json``, as models were before
references existed: the backfill gives it a sidecar."""


@dataclass(frozen=True)
class Backfill:
    home: Path
    before: dict[str, Any] | None
    """``BACKFILLED``'s reference before the backfill ran"""
    printed: str


def _reference_of(home: Path, tag: str) -> dict[str, Any] | None:
    return store.stored_reference(ModelStore(home / "models").get(tag), home)


@pytest.fixture(scope="module")
def backfilled(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Backfill:
    home = degraded_home(model_store, tmp_path_factory.mktemp("monitoring"))
    store_wine(BACKFILLED, home / "models", with_reference=False)
    before = _reference_of(home, BACKFILLED)
    env = {**os.environ, "BENTOML_HOME": str(home), **TOKENS}
    done = subprocess.run([sys.executable, "-m", "training.backfill"], cwd=ROOT, env=env,
                          check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return Backfill(home, before, done.stdout)


@pytest.fixture(scope="module")
def monitored(backfilled: Backfill) -> Iterator[Server]:
    folder = backfilled.home.parent
    env = {**os.environ, "BENTOML_HOME": str(backfilled.home), **TOKENS}
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["monitoring"] = {"sample_fraction": 1.0, "check_every_s": 0, "dashboard_refresh_s": 5}
    config["experiments"]["wine"] = {"salt": "wine-monitoring", "variants": [
        {"name": "sklearn-v1", "model": BACKFILLED, "weight": 1},
        {"name": "shuffled", "model": DEGRADED, "weight": 1}]}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    env["BUNDLE_CONFIG"] = str(folder / "config.yaml")
    running = Server("service:Bundle", ROOT, env, folder)
    yield running
    running.stop()


def _replay(client: httpx.Client, rows: np.ndarray, labels: np.ndarray, classes: list[str], tag: str) -> None:
    answers = predict(client, "wine", rows, [f"{tag}-{i}" for i in range(len(rows))])
    wait_logged(client, [a["prediction_id"] for a in answers])
    items = [{"prediction_id": a["prediction_id"], "label": classes[y]} for a, y in zip(answers, labels)]
    posted = client.post("/feedback", json={"feedback": items}, headers=FEEDBACK)
    assert posted.json().get("counts") == {"matched": len(items)}, posted.text


def _sampled(client: httpx.Client, rows: int) -> bool:
    check = client.post("/experiments/wine/drift", json={}, headers=ADMIN).json()
    return sum(v["rows"] for v in check["variants"].values()) >= rows


def test_drift_is_found_in_the_shifted_feature_only(monitored: Server) -> None:
    data = datasets.load("wine")
    x = np.concatenate([data.x_train, data.x_test])
    y = np.concatenate([data.y_train, data.y_test])
    with httpx.Client(base_url=monitored.url, timeout=60) as client:
        assert client.get("/experiments/wine/drift").status_code == 404  # no check yet
        assert client.post("/experiments/wine/drift", json={}).status_code == 401
        _replay(client, x, y, data.classes, "plain")
        wait_for(lambda: _sampled(client, len(x)), "sampled")
        plain = client.get("/experiments/wine/drift").json()
        for name, variant in plain["variants"].items():  # no input, nor the answers (classes, confidence)
            assert variant["status"] == "checked" and variant["drifting"] == [], (name, variant["top"])
            assert {"__predictions__", "__confidence__"} <= set(variant["tests"])
        shifted = x.copy()
        shifted[:, data.feature_names.index(SHIFTED)] *= SCALE
        _replay(client, shifted, y, data.classes, "shifted")
        wait_for(lambda: _sampled(client, 2 * len(x)), "sampled")
        check = client.get("/experiments/wine/drift").json()
        metrics = client.get("/metrics").text
    assert check["drift"] and SHIFTED in [t["feature"] for t in check["top"]]
    for name, variant in check["variants"].items():
        inputs = [f for f in variant["drifting"] if not f.startswith("__")]
        assert inputs == [SHIFTED], (name, variant["top"])
        assert variant["tests"][SHIFTED]["psi"] >= check["settings"]["psi_threshold"]
    assert f'bundle_drift_detected{{feature="{SHIFTED}",model="wine",variant="sklearn-v1"}} 1.0' in metrics


def test_the_backfill_writes_a_sidecar_the_drift_check_uses(backfilled: Backfill, monitored: Server) -> None:
    """A model stored without a reference gets one beside the store (its folder untouched, so its
    integrity record still holds), and the drift check above compared its variant with that one."""
    model = ModelStore(backfilled.home / "models").get(BACKFILLED)
    assert backfilled.before is None and not (Path(model.path) / reference.REFERENCE_FILE).exists()
    assert BACKFILLED in backfilled.printed and DEGRADED not in backfilled.printed  # it has its own
    assert reference.sidecar_path(backfilled.home, *BACKFILLED.split(":")).is_file()
    after = _reference_of(backfilled.home, BACKFILLED)
    assert after is not None
    check = httpx.get(f"{monitored.url}/experiments/wine/drift", timeout=30).json()["variants"]["sklearn-v1"]
    assert check["model_tag"] == BACKFILLED and check["status"] == "checked"
    for name, test in check["tests"].items():
        if not name.startswith("__"):
            assert test["reference_mean"] == pytest.approx(after["features"][name]["mean"]), name
    assert check["tests"]["__confidence__"]["reference_mean"] == pytest.approx(after["confidence"]["mean"])


def test_the_dashboard_in_a_real_browser(monitored: Server) -> None:
    """After the traffic above: no console error at laptop and phone widths, charts with data points,
    the degraded candidate's accuracy below the control's, the drifted feature marked; screenshots."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        for label, (width, height) in WIDTHS.items():
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            assert page.goto(f"{monitored.url}/dashboard").status == 200
            assert page.locator("svg[data-chart=traffic] circle.point").count() > 0
            page.screenshot(path=str(ARTIFACTS / f"dashboard-{label}.png"), full_page=True)
            assert page.goto(f"{monitored.url}/dashboard/wine").status == 200
            values = _points(page.eval_on_selector_all(
                "svg[data-chart=accuracy] circle.point",
                "els => els.map(e => [e.dataset.series, Number(e.dataset.value)])"))
            assert values["sklearn-v1"] and values["shuffled"]
            assert np.mean(values["shuffled"]) < np.mean(values["sklearn-v1"])
            calibration = _points(page.eval_on_selector_all(  # per time window, as accuracy
                "svg[data-chart=calibration] circle.point",
                "els => els.map(e => [e.dataset.series, Number(e.dataset.value)])"))
            assert calibration["sklearn-v1"] and calibration["shuffled"]
            assert all(0 <= e <= 1 for points in calibration.values() for e in points)
            assert page.locator("svg[data-chart=traffic] circle.point").count() > 0
            assert page.locator(f"rect.cell[data-feature='{SHIFTED}'][data-drift=true]").count() > 0
            assert page.locator("[data-panel=rollout] [data-rollout-state=none]").inner_text() == "no rollout"
            hidden = page.eval_on_selector_all(  # drawn, not only in the DOM: a malformed tag hides what follows it
                "circle.point, rect.cell", "els => els.filter(e => !e.getBoundingClientRect().width).length")
            assert hidden == 0
            scroll = page.evaluate("document.documentElement.scrollWidth")
            assert scroll <= width, f"the page is {scroll}px wide at a {width}px viewport"
            page.screenshot(path=str(ARTIFACTS / f"dashboard-wine-{label}.png"), full_page=True)
            page.close()
        browser.close()
    assert problems == []


def test_the_rollout_panel_shows_a_rollout_and_its_steps(monitored: Server) -> None:
    """What GET /experiments/wine/rollout answers, in a real browser: a rollout of the degraded candidate
    at its first step (too few labels at it to move or to decide), then aborted."""
    from playwright.sync_api import sync_playwright

    with httpx.Client(base_url=monitored.url, timeout=60) as client, sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport=dict(zip(("width", "height"), WIDTHS["laptop"])))
        started = client.post("/experiments/wine/rollout", headers=ADMIN,
                              json={"candidate": "shuffled", "reason": "the dashboard test"})
        assert started.status_code == 200, started.text
        try:
            assert page.goto(f"{monitored.url}/dashboard/wine").status == 200
            status = client.get("/experiments/wine/rollout").json()
        finally:
            aborted = client.post("/experiments/wine/rollout/abort", json={"reason": "end of the test"},
                                  headers=ADMIN)
        assert aborted.status_code == 200, aborted.text
        panel = page.locator("[data-panel=rollout] [data-rollout-state]")
        assert (status["state"], status["step"]) == ("running", 0)
        assert panel.get_attribute("data-rollout-state") == "running"
        assert float(panel.get_attribute("data-share")) == pytest.approx(status["share"]) == pytest.approx(1)
        text = panel.inner_text()
        assert "1 of 5 (1%)" in text and "more labelled predictions of shuffled" in text
        assert status["controller"]["holder"] in text and status["reason"] in text
        steps = page.locator("[data-panel=rollout] tr.rollout-step")
        assert steps.count() == len(status["history"]) >= 1 and "the dashboard test" in steps.first.inner_text()
        page.screenshot(path=str(ARTIFACTS / "dashboard-wine-rollout.png"), full_page=True)
        assert page.goto(f"{monitored.url}/dashboard/wine").status == 200
        assert panel.get_attribute("data-rollout-state") == "aborted"
        assert float(panel.get_attribute("data-share")) == 0
        assert steps.count() == len(status["history"]) + 1 and "end of the test" in steps.last.inner_text()
        browser.close()


def _points(pairs: list[Any]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for series, value in pairs:
        out.setdefault(series, []).append(value)
    return out
