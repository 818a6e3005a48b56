"""Issue: benchmarks. A smoke run of the whole benchmark: every step for a few seconds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_module


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (make tools installs it)")
def test_benchmark_smoke_run_writes_report_and_plots(model_store: Path, tmp_path: Path) -> None:
    done = run_module("bench", "--smoke", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    for section in ("## Targets", "## HTTP", "## Runtimes in process", "## Memory"):
        assert section in report
    for plot in ("latency_cdf.png", "throughput_vs_concurrency.png", "runtime_latency.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "results.json").read_text())
    http = {r["name"]: r for r in results["http"]}
    assert http["bare c=8"]["statuses"].get("200", 0) > 0
    assert all(set(r["statuses"]) == {"200"} for r in results["http"]), "no errors at smoke load"
    assert any(r["extra"].get("bentoml_service_adaptive_batch_size", 0) > 1 for r in results["http"]
               if r["extra"]["server"] == "bundle")
    twins = [r for r in results["runtimes"] if r["tag"] != r["source"]]
    assert twins and all(r["median_ms"] > 0 for r in twins)
