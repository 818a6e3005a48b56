"""The shipped Prometheus alert rules load in Prometheus's own checker, and name series the service exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from common import metrics

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"
SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def test_promtool_checks_the_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: `make tools` installs Debian's prometheus package")
    checked = subprocess.run([promtool, "check", "rules", str(RULES)], check=False, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout


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
