"""The shipped Prometheus configuration and rules load in Prometheus's own checker, name series the service
exports, and compute what they claim (``promtool test rules`` on synthetic series of two replicas, and of
rollbacks, rollout steps and promotions)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from common import metrics

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
RULES_TEST = Path(__file__).with_name("fleet_rules_test.yml")
ROLLBACK_TEST = Path(__file__).with_name("rollback_rules_test.yml")
SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def promtool(*args: str) -> str:
    """``promtool args``' output, failing the test unless it succeeds."""
    program = shutil.which("promtool")
    if program is None:
        pytest.fail("promtool is missing: `make tools` installs Debian's prometheus package")
    checked = subprocess.run([program, *args], check=False, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    return checked.stdout


def test_promtool_checks_the_rules() -> None:
    assert "SUCCESS" in promtool("check", "rules", str(RULES))


def test_promtool_checks_the_fleet_config() -> None:
    out = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert "is valid prometheus config file syntax" in out and "1 rule files found" in out


def test_the_fleet_rules_sum_over_replicas_and_the_store_alert_fires() -> None:
    assert "SUCCESS" in promtool("test", "rules", str(RULES_TEST))


def test_every_rollback_fires_the_alert_and_no_step_advance_or_promotion_does() -> None:
    """An admin's and the rollout controller's rollbacks, each the first of its worker (its counter
    born at 1) or a later one; a rollout's steps and promotion beside them."""
    assert "SUCCESS" in promtool("test", "rules", str(ROLLBACK_TEST))


def _counted(name: str, **labels: str) -> float:
    return sum(metrics.counter_totals(metrics.collect(), name, (), **labels).values())


def test_the_rollout_controller_counts_its_rollbacks_and_nothing_else(tmp_path: Path) -> None:
    """The series the alert reads, from the real controller (tests/unit/test_rollout.py's world): one
    rollback of a degraded candidate counts once; a good candidate's step advances count nothing."""
    from tests.unit.test_rollout import World, run

    before = _counted("bundle_rollbacks", model="m")
    good = World(tmp_path / "good", {"control": 0.95, "candidate": 0.95})
    good.controller.start("m", "candidate", {})
    assert run(good, lambda s: s["step"] == 2)["state"] == "running"
    assert _counted("bundle_rollbacks", model="m") == before
    bad = World(tmp_path / "bad", {"control": 0.95, "candidate": 0.3}, steps=[20, 50, 100])
    bad.controller.start("m", "candidate", {})
    assert run(bad, lambda s: s["state"] != "running")["state"] == "rolled_back"
    bad.controller.round()  # a later round finds nothing running: still one rollback
    assert _counted("bundle_rollbacks", model="m") == before + 1


def test_every_series_in_the_rules_is_exported() -> None:
    exported = {m._name for m in vars(metrics).values() if hasattr(m, "_name")}  # bentoml metric proxies
    exported |= {getattr(m, "name", None) for m in vars(metrics).values()}
    groups = yaml.safe_load(RULES.read_text())["groups"]
    names = {name for g in groups for rule in g["rules"]
             for name in re.findall(r"\b(bundle_[a-z_]+)", rule["expr"])}
    assert names
    for name in names:
        base = next((name[: -len(s)] for s in SUFFIXES if name.endswith(s)), name)
        assert base in exported, f"{name} is not a series of common/metrics.py"
