"""Issue: benchmarks. A smoke run of the whole benchmark (every step for a few seconds), and of the
locustfile users are given."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import soak
from tests.e2e.conftest import ROOT, run_module

pytestmark = pytest.mark.slow  # servers, databases or builds of its own


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (make tools installs it)")
def test_benchmark_smoke_run_writes_report_and_plots(model_store: Path, tmp_path: Path) -> None:
    done = run_module("bench", "--smoke", "--peers", "mosec", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    for section in ("## Targets", "## HTTP", "## Peers", "## Runtimes in process", "## Memory",
                    "## Memory per runtime", "## Prediction log on against off, interleaved", "## Load spike"):
        assert section in report
    assert re.search(r"\| prediction log on against off, interleaved runs +\| [^|]+\| [\d.]+x over 1 rounds", report)
    assert re.search(r"\| mosec +\| \d+ +\| [\d.]+x", report), "the peer's row with its ratio"
    for plot in ("latency_cdf.png", "throughput_vs_concurrency.png", "runtime_latency.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "results.json").read_text())
    http = {r["name"]: r for r in results["http"]}
    assert http["bare c=8"]["statuses"].get("200", 0) > 0
    def answered(r: dict) -> set[str]:
        """Every answer a success: a peer's closed loop counted by wrk, gRPC's by the server (its
        answered rows: a call refused before the data plane would show as "not OK")."""
        if r["extra"]["path"].startswith("grpc:"):
            return {"OK"}
        return {"2xx"} if r["extra"]["peer"] and r["mode"] == "closed" else {"200"}

    assert all(set(r["statuses"]) == answered(r) for r in results["http"]), "no errors at smoke load"
    if shutil.which("h2load"):
        assert http["gRPC OIP infer wine c=8"]["requests"] > 0 and \
            http["gRPC OIP infer wine c=8"]["latency_ms"]["99"] > 0, "h2load drove the gRPC scenario"
    assert any(r["extra"].get("bundle_batch_rows", 0) > 1 for r in results["http"]
               if r["extra"]["server"] == "bundle"), "concurrent requests shared runtime calls"
    assert sorted((r["server"], set(r["statuses"])) for r in results["log_interleaved"]) == [
        ("log off", {"2xx"}), ("log on", {"2xx"})], "one round: each server once, every answer a success"
    assert (results["spike"]["rate"], results["spike"]["factor"], results["spike"]["seconds"]) == (50, 2, 2)
    assert re.search(r"\| p99 after a 2x spike of 2 s \(from 50 req/s\) +\|", report), "the load sent, named"
    spike = results["spike"]["windows"]
    assert [r["from_end_s"] for r in spike] == [float(s) for s in range(-7, 10)], "1-s windows, 5 before to 10 after"
    assert all(r["requests"] > 0 and r["non_200"] == 0 for r in spike), spike
    assert http["mosec wine c=8"]["requests"] > 0 and http["mosec wine open 50/s"]["requests"] > 0
    twins = [r for r in results["runtimes"] if r["tag"] != r["source"]]
    assert twins and all(r["median_ms"] > 0 for r in twins)
    imports = {s["runtime"]: s["anon_mib"] for s in results["runtime_memory"] if s["step"] == "import"}
    assert set(imports) == {"onnxruntime", "sklearn", "tensorflow", "torch"}, "every runtime of the stored models"
    assert imports["torch"] > 50 and imports["tensorflow"] > 50, "a deep-learning library costs a worker memory"


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (make tools installs it)")
def test_the_interleaved_bench_runs_every_configuration_each_round_and_compares_them(
        model_store: Path, tmp_path: Path) -> None:
    servers = {"log on": {}, "log off": {"store": {"log_predictions": False}}}
    done = run_module("bench.interleaved", "--servers", json.dumps(servers), "--rounds", "2", "--seconds", "1",
                      "--connections", "4", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = json.loads((tmp_path / "interleaved.json").read_text())["runs"]
    assert [(r["round"], r["server"]) for r in runs] == [(0, "log on"), (0, "log off"), (1, "log off"), (1, "log on")]
    assert all(r["statuses"] == {"2xx": r["statuses"]["2xx"]} and r["req_s"] > 0 and r["worker_cpu_us"] > 0
               and 0 < r["p50_ms"] <= r["p99_ms"] for r in runs), runs
    assert re.search(r"\| log on +\| \d+ +\| 1\.000 \(1\.00-1\.00\)", done.stdout), done.stdout
    assert re.search(r"\| log off +\| \d+ +\| [\d.]+ \(", done.stdout), done.stdout


def test_locustfile_runs_every_endpoint_without_failures(server, tmp_path: Path) -> None:
    done = subprocess.run(
        [str(Path(sys.executable).with_name("locust")), "-f", str(ROOT / "locustfile.py"), "--headless", "-u", "8",
         "-r", "8", "-t", "6s", "--host", server.url, "--csv", str(tmp_path / "locust"), "--only-summary"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    stats = {row["Name"]: row for row in csv.DictReader((tmp_path / "locust_stats.csv").open())}
    assert int(stats["Aggregated"]["Request Count"]) > 50, done.stderr[-2000:]
    assert int(stats["Aggregated"]["Failure Count"]) == 0, done.stderr[-2000:]
    assert any(name.startswith("/predict [") for name in stats)
    assert "/v2/models/[model]/infer" in stats and "/classify_image" in stats


@pytest.mark.parametrize("arguments", [["--share", "0"], ["--share", "1.5"], ["--seconds", "-5"],
                                       ["--step-seconds", "nan"]])
def test_soak_refuses_a_rate_or_length_that_could_not_test_anything(arguments: list[str],
                                                                     capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        soak.main(arguments)
    assert exit_.value.code == 2
    assert f"argument {arguments[0]}" in capsys.readouterr().err
