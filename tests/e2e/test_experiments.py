"""Issue: A/B experiments, against real servers with 2 workers: split, stickiness, live weights and
variants through the admin endpoints (kept in the experiment store across a restart), shadow traffic and
the sample-ratio-mismatch report."""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections import Counter
from pathlib import Path
from collections.abc import Callable, Iterator

import httpx
import pytest
from scipy.stats import binomtest

from common import config, datasets
from experiments.repositorystore import RepositoryStore
from experiments.router import Router
from experiments.store import ExperimentStore
from tests.e2e.conftest import ADMIN_TOKEN, FEEDBACK_TOKEN, ROOT, Server, run_module, server_env
from tests.e2e.test_decisions import wait_logged

CONFIG = config.load()
WINE_ROW = datasets.load("wine").x_test[0].tolist()
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FEEDBACK = {"Authorization": f"Bearer {FEEDBACK_TOKEN}"}
COUNTS_LAG_S = 5.0  # deadline for the store's counts to follow the answers (copied once a second), never a measured time


def predict_as(client: httpx.Client, users: list[str], model: str = "wine") -> list[dict]:
    row = datasets.load(model).x_test[0].tolist()
    body = {"instances": [{"model": model, "inputs": row, "user_id": u} for u in users]}
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_distinct_users_land_within_five_points_of_weights(client: httpx.Client) -> None:
    answers = []
    for start in range(0, 1200, 100):  # many requests, so both workers take part
        answers += predict_as(client, [f"split-{i}" for i in range(start, start + 100)])
    shares = Counter(a["variant"] for a in answers)
    weights = {v.name: v.weight for v in CONFIG.experiments["wine"].variants}
    for name, weight in weights.items():
        assert abs(shares[name] / len(answers) - weight / sum(weights.values())) < 0.05


def test_one_user_always_gets_one_variant(client: httpx.Client) -> None:
    seen = {a["variant"] for _ in range(50) for a in predict_as(client, ["same-user"])}
    assert len(seen) == 1


def test_single_answer_endpoints_name_variant_in_header(client: httpx.Client) -> None:
    response = client.post("/predict_ndarray", json={"model": "wine", "inputs": [WINE_ROW], "user_id": "h"})
    assert response.headers["X-Variant"] == response.json()["variant"]


def test_shadow_never_answers_and_its_agreement_is_counted(client: httpx.Client) -> None:
    """The session's earlier digits traffic is in the report too (a few percent of varied rows disagree,
    INT8 against FP32), so this test reads what its own 64 answers added: all compared, all but a few
    agreeing (one row, answered 64 times)."""
    experiment = CONFIG.experiments["digits"]
    assert experiment.shadow is not None, "the default configuration shadows digits"

    def compared() -> tuple[int, int]:
        shadow = client.get("/experiments/digits/report").json()["shadow"]
        return shadow.get("agree", 0), shadow.get("agree", 0) + shadow.get("disagree", 0)

    agreed_before, compared_before = compared()
    answers = predict_as(client, [f"shadow-{i}" for i in range(64)], model="digits")
    assert {a["model_tag"] for a in answers} <= {v.model for v in experiment.variants}
    assert experiment.shadow.name not in {a["variant"] for a in answers}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        agreed, total = compared()
        if total - compared_before >= 64:
            break
        time.sleep(0.2)
    assert total - compared_before >= 64, "every answer of this test compared with the shadow's"
    assert (agreed - agreed_before) / (total - compared_before) >= 0.95


def test_experiments_view_shows_configuration_and_live_counts(client: httpx.Client) -> None:
    def counted() -> float:
        return sum(v["count"] for v in client.get("/experiments").json()["experiments"]["wine"]["variants"])

    before = counted()
    predict_as(client, [f"view-{i}" for i in range(20)])
    deadline = time.monotonic() + COUNTS_LAG_S
    while counted() < before + 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    view = client.get("/experiments").json()["experiments"]["wine"]
    assert [v["name"] for v in view["variants"]] == [v.name for v in CONFIG.experiments["wine"].variants]
    assert sum(v["count"] for v in view["variants"]) >= before + 20
    assert sum(v["configured_share"] for v in view["variants"]) == pytest.approx(1.0)


def test_admin_needs_the_right_token(client: httpx.Client) -> None:
    body = {"weights": {"sklearn-v1": 2}}
    assert client.put("/experiments/wine", json=body).status_code == 401
    wrong = client.put("/experiments/wine", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and ADMIN_TOKEN not in wrong.text
    assert client.put("/experiments/nope", json=body, headers=ADMIN).status_code == 404
    bad = client.put("/experiments/wine", json={"weights": {"nope": 1}}, headers=ADMIN)
    assert bad.status_code == 400 and "weights" in bad.json()["field"]
    negative = client.put("/experiments/wine", json={"weights": {"sklearn-v1": -1}}, headers=ADMIN)
    assert negative.status_code == 400 and "weights.sklearn-v1" in negative.json()["error"]


def test_the_admin_token_never_reaches_the_logs(server: Server, client: httpx.Client) -> None:
    client.put("/experiments/wine", json={"weights": {"nope": 1}}, headers=ADMIN)
    client.put("/experiments/wine", json={"weights": {"sklearn-v1": 1}}, headers={"Authorization": "Bearer x" + ADMIN_TOKEN})
    assert ADMIN_TOKEN not in server.output()


@pytest.fixture(scope="module")
def admin_config(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("admin")
    server_env(model_store, folder / "config.yaml")
    return folder / "config.yaml"


@pytest.fixture(scope="module")
def admin_server(model_store: Path, admin_config: Path) -> Iterator[Server]:
    running = Server("service:Bundle", ROOT, server_env(model_store, admin_config, BUNDLE_ADMIN_TOKEN=ADMIN_TOKEN),
                     admin_config.parent)
    yield running
    running.stop()


def wine_variants(url: str, users: list[str]) -> Counter:
    with httpx.Client(base_url=url, timeout=60) as c:
        answers = []
        for start in range(0, len(users), 50):
            answers += predict_as(c, users[start:start + 50])
    return Counter(a["variant"] for a in answers)


def test_feedback_is_refused_by_a_server_without_a_feedback_token(admin_server: Server) -> None:
    """This server has an admin token but no BUNDLE_FEEDBACK_TOKEN: /feedback is disabled for every
    caller, refused before its body is read."""
    for headers, body in (({}, b'{"feedback": []}'), (FEEDBACK, b"not json"), (ADMIN, b'{"feedback": []}')):
        refused = httpx.post(f"{admin_server.url}/feedback", content=body, timeout=30,
                             headers={**headers, "Content-Type": "application/json"})
        assert refused.status_code == 403, refused.text
        assert "BUNDLE_FEEDBACK_TOKEN" in refused.text and "Traceback" not in refused.text


TWIN = "onnx-twin"
"""A variant added live, serving a model the server already holds (the wine ONNX twin)."""


def test_a_variant_is_added_ramped_and_removed_while_every_request_is_answered(
        admin_server: Server, admin_config: Path) -> None:
    twin_tag = CONFIG.experiments["wine"].variants[1].model
    statuses: Counter = Counter()
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=admin_server.url, timeout=30) as c:
            for i in range(100_000):
                if stop.is_set():
                    return
                body = {"instances": [{"model": "wine", "inputs": WINE_ROW, "user_id": f"ramp-{i}"}]}
                statuses[c.post("/predict", json=body).status_code] += 1

    def admin(method: str, path: str, **kwargs: object) -> httpx.Response:
        return httpx.request(method, f"{admin_server.url}{path}", headers=ADMIN, timeout=30, **kwargs)

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        added = admin("POST", "/experiments/wine/variants", json={"name": TWIN, "model": twin_tag})
        assert added.status_code == 200, added.text
        assert [v["weight"] for v in added.json()["variants"]] == [1, 1, 0]
        # at once, whichever worker answers, admin operations know the new variant: a rollout of it
        # gets as far as its (invalid) policy, not to "unknown variant"
        for _ in range(6):
            early = admin("POST", "/experiments/wine/rollout", json={"candidate": TWIN, "policy": {"steps": [50, 10]}})
            assert early.status_code == 400 and early.json()["field"].startswith("policy"), early.text
        # and the controller, in whichever worker holds its lease, sees it too: never aborted as unknown
        assert admin("POST", "/experiments/wine/rollout", json={"candidate": TWIN}).status_code == 200
        time.sleep(1.5)  # a few controller rounds
        rollout = httpx.get(f"{admin_server.url}/experiments/wine/rollout").json()
        assert rollout["state"] != "aborted" and "no longer a variant" not in rollout["reason"], rollout["reason"]
        if rollout["state"] == "running":  # a guardrail on this busy test server may have rolled it back
            assert admin("POST", "/experiments/wine/rollout/abort", json={}).status_code == 200
        time.sleep(1.0)  # the candidate back at weight 0 in every worker (repository.poll_s)
        assert TWIN not in wine_variants(admin_server.url, [f"zero-{i}" for i in range(200)])
        for weight in (0.5, 2):
            assert admin("PUT", "/experiments/wine", json={"weights": {TWIN: weight}}).status_code == 200
        time.sleep(1.0)  # every worker follows the store within a poll (repository.poll_s)
        shares = wine_variants(admin_server.url, [f"ramped-{i}" for i in range(400)])
        assert 0.35 < shares[TWIN] / 400 < 0.65, shares
        refused = admin("DELETE", f"/experiments/wine/variants/{TWIN}")
        assert refused.status_code == 409 and "weight" in refused.json()["error"], refused.text
        assert admin("PUT", "/experiments/wine", json={"weights": {TWIN: 0}}).status_code == 200
        removed = admin("DELETE", f"/experiments/wine/variants/{TWIN}", params={"reason": "done"})
        assert removed.status_code == 200, removed.text
        assert [v["name"] for v in removed.json()["variants"]] == [v.name for v in CONFIG.experiments["wine"].variants]
    finally:
        stop.set()
        sender.join()
    assert set(statuses) == {200} and sum(statuses.values()) > 50, statuses
    history = httpx.get(f"{admin_server.url}/experiments/wine/history").json()["changes"]
    assert [c["reason"] for c in history[:1]] == ["done"] and len(history) >= 5
    store = ExperimentStore(f"sqlite:///{admin_config.parent / 'bentoml_home' / 'experiments.sqlite'}")
    assert RepositoryStore(store).wishes()[twin_tag][0] == "loaded"  # a restart loads it too
    store.close()


def test_weight_change_reaches_both_workers_and_survives_restart(
        admin_server: Server, admin_config: Path, model_store: Path) -> None:
    names = [v.name for v in CONFIG.experiments["wine"].variants]
    declared = admin_config.read_text()
    change = httpx.put(f"{admin_server.url}/experiments/wine", headers=ADMIN, timeout=30,
                       json={"weights": {names[0]: 0, names[1]: 1}})
    assert change.status_code == 200, change.text
    time.sleep(1.0)  # every worker applies a change within one second
    assert wine_variants(admin_server.url, [f"after-{i}" for i in range(400)]) == Counter({names[1]: 400})
    assert admin_config.read_text() == declared, "config.yaml is the declaration: changes go to the store"
    admin_server.stop()

    # restarted without a token: the weights are kept (the store wins over an unchanged config.yaml),
    # and the admin endpoint is disabled
    restarted = Server("service:Bundle", ROOT, server_env(model_store, admin_config), admin_config.parent)
    try:
        view = httpx.get(f"{restarted.url}/experiments").json()["experiments"]["wine"]
        assert [v["weight"] for v in view["variants"]] == [0, 1]
        assert view["source"] == "admin" and view["config"] == {"declared": True, "matches_store": False}
        assert wine_variants(restarted.url, [f"again-{i}" for i in range(100)]) == Counter({names[1]: 100})
        refused = httpx.put(f"{restarted.url}/experiments/wine", json={"weights": {names[0]: 1}}, headers=ADMIN)
        assert refused.status_code == 403
    finally:
        restarted.stop()


def logged_report(client: httpx.Client, model: str, ready: Callable[[dict], bool]) -> dict:
    """The report once the prediction log has flushed what the test sent (every 100 ms per worker)."""
    deadline = time.monotonic() + 5
    while True:
        report = client.get(f"/experiments/{model}/report").json()
        if ready(report) or time.monotonic() > deadline:
            return report
        time.sleep(0.2)


def test_report_flags_a_sample_ratio_mismatch(client: httpx.Client) -> None:
    experiment = CONFIG.experiments["cancer"]
    router = Router(CONFIG.experiments)
    first = experiment.variants[0].name
    skewed = [u for u in (f"skew-{i}" for i in range(3000)) if router.route("cancer", u).variant.name == first]
    for start in range(0, 400, 100):
        predict_as(client, skewed[start:start + 100], model="cancer")
    report = logged_report(client, "cancer",
                           lambda r: r.get("srm_unit") == "user" and r["verdict"].startswith("SRM detected"))
    assert report["verdict"].startswith("SRM detected"), report
    assert report["p_value"] < 0.001 and report["srm_unit"] == "user"


def test_report_is_healthy_for_a_fair_split(client: httpx.Client) -> None:
    before = client.get("/experiments/wine/report").json()
    units = before["rows"] if before.get("srm_unit") == "user" else 0  # earlier modules' units, already logged
    predict_as(client, [f"fair-{i}" for i in range(600)])  # 600 new units, both variants in one request
    report = logged_report(client, "wine", lambda r: r.get("srm_unit") == "user" and r["rows"] >= units + 600)
    assert report["verdict"] == "healthy" and report["srm_unit"] == "user", json.dumps(report)[:4000]
    for variant in report["variants"]:
        assert variant["latency_ms"]["p50"] is not None
        assert sum(variant["labels"].values()) > 0


def markdown_rows(text: str, column: str) -> dict[str, dict[str, str]]:
    """The first markdown table in ``text`` with a column named ``column``: its rows by first cell."""
    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip("|").split("|")]

    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|") and column in cells(line))
    return {row[0]: dict(zip(cells(lines[start]), row))
            for row in map(cells, itertools.takewhile(lambda line: line.startswith("|"), lines[start + 2:]))}


def test_report_cli_prints_table_and_verdict(server: Server, client: httpx.Client) -> None:
    data = datasets.load("cancer")
    control = CONFIG.experiments["cancer"].control.name
    before = client.get("/experiments/cancer/report").json()["outcomes"]["variants"].get(control, {})
    assert not before.get("labelled"), "the session server's only cancer labels are this test's"
    instances = [{"model": "cancer", "inputs": row.tolist(), "variant": control, "id": f"cli-{i}"}
                 for i, row in enumerate(data.x_test[:12])]
    served_from = time.time()
    answers = client.post("/predict", json={"instances": instances}).json()
    served_by = time.time()
    # the first 8 labelled as answered, the last 4 as the other class: a known confusion matrix
    truth = [a["label"] if i < 8 else next(c for c in data.classes if c != a["label"])
             for i, a in enumerate(answers)]
    items = [{"prediction_id": a["prediction_id"], "label": t} if i % 2 else {"id": f"cli-{i}", "label": t}
             for i, (a, t) in enumerate(zip(answers, truth))]
    wait_logged(client, [a["prediction_id"] for a in answers])
    time.sleep(max(0.0, served_by + 1.0 - time.time()))  # every label at least a second late
    labelled_from = time.time()
    posted = client.post("/feedback", json={"feedback": items}, headers=FEEDBACK).json()
    labelled_by = time.time()
    assert [r["status"] for r in posted["results"]] == ["matched"] * 12, posted

    done = run_module("experiments.report", "--url", server.url, "wine", "digits", "cancer")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("verdict: ") == 3
    assert "sample-ratio test" in done.stdout and "shadow onnx-fp32-v2" in done.stdout
    cancer = done.stdout[done.stdout.index("experiment cancer"):]
    outcome = markdown_rows(cancer, "label delay median / p90")[control]
    assert outcome["labelled"] == "12" and int(outcome["served"]) >= 12
    assert int(outcome["served"]) == 12 + int(outcome["pending"]) + int(outcome["expired"])
    wilson = binomtest(8, 12).proportion_ci(method="wilson")
    assert outcome["accuracy [95% Wilson]"] == f"{8 / 12:.4f} [{wilson.low:.4f}, {wilson.high:.4f}] n=12"
    recent = next(v for k, v in outcome.items() if k.startswith("accuracy, last "))
    assert recent == outcome["accuracy [95% Wilson]"]  # all of it is recent
    delays = re.fullmatch(r"([\d.]+) s / ([\d.]+) s", outcome["label delay median / p90"])
    assert delays, outcome
    for delay in map(float, delays.groups()):
        assert labelled_from - served_by - 0.05 <= delay <= labelled_by - served_from + 0.05
    confusion = markdown_rows(cancer[cancer.index(f"confusion of {control}"):], "true \\ answered")
    expected = Counter(zip(truth, (a["label"] for a in answers)))
    assert {(t, a): int(n) for t, row in confusion.items() for a, n in row.items() if a in data.classes} == {
        (t, a): expected[t, a] for t in data.classes for a in data.classes}
    outcomes = client.get("/experiments/cancer/report").json()["outcomes"]
    for scope in (outcomes["variants"], outcomes["recent"]["variants"]):  # every served row, not only the labelled
        assert scope[control]["labelled"] == 12 and scope[control]["served"] == int(outcome["served"])
