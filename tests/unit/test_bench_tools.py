"""Issue: performance. The spike benchmark's schedule and windows, and its refusal of a load that
could not test anything (the benchmark itself runs against real servers: ``python -m bench.spike``);
the log writer's benchmark on a real SQLite store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import logwriter, peer_servers, spike
from bench.__main__ import chosen_peers
from bench.loadgen import Sent
from tests import ROOT


def test_schedule_sends_the_spike_between_two_base_periods() -> None:
    offsets = spike.schedule(rate=10, factor=5, spike_s=2)
    assert len(offsets) == 10 * spike.BEFORE_S + 50 * 2 + 10 * spike.AFTER_S
    assert offsets == sorted(offsets)
    during = [t for t in offsets if spike.BEFORE_S <= t < spike.BEFORE_S + 2]
    assert len(during) == 100


def test_windows_are_named_from_the_spike_end_with_their_percentiles() -> None:
    sent = [Sent(0.1 * i, 1.0 if i < 20 else 100.0, "200" if i % 7 else "503") for i in range(30)]
    rows = spike.windows(sent, spike_end_s=2.0)
    assert [r["from_end_s"] for r in rows] == [-2.0, -1.0, 0.0]
    assert [r["requests"] for r in rows] == [10, 10, 10]
    assert rows[0]["p99_ms"] == pytest.approx(1.0) and rows[2]["p50_ms"] == pytest.approx(100.0)
    assert sum(r["non_200"] for r in rows) == 5


@pytest.mark.parametrize("arguments", [["--rate", "0"], ["--factor", "-1"], ["--p99-ms", "0"]])
def test_spike_refuses_a_load_that_could_not_test_anything(arguments: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.spike", "--url", "http://127.0.0.1:9", *arguments],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and "must be above 0" in done.stderr


def test_the_log_writer_bench_times_every_writer_of_every_tree_and_checks_their_rows_were_written(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Two rounds of two writers on a real SQLite store each: a CPU cost a row for each, and a writer
    whose rows did not all reach the store fails the run instead of looking cheap."""
    assert logwriter.main(["--rounds", "2", "--processes", "2", "--rows", "20", "--flushes", "3",
                           "--flush-ms", "10", "--out", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "logwriter.json").read_text())["runs"]
    assert [run["round"] for run in runs] == [0, 1] and {run["tree"] for run in runs} == {str(ROOT)}
    assert all(len(run["us_a_row"]) == 2 and all(0 < value < 10_000 for value in run["us_a_row"]) for run in runs)
    assert f"| {ROOT} |" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="the log wrote 0 of"):
        logwriter.writer(rows=5, flushes=1, flush_s=0.01, url=f"sqlite:///{tmp_path}")  # a folder


def test_peers_alone_means_every_peer_and_none_means_none() -> None:
    """``--peers`` with no name once ran no peer, so a report asked for with peers came without them."""
    every = sorted(peer_servers.PEERS)
    assert chosen_peers([], smoke=False) == chosen_peers([], smoke=True) == every
    assert chosen_peers(None, smoke=False) == every and chosen_peers(None, smoke=True) == []
    assert chosen_peers(["mosec", "kserve", "mosec"], smoke=False) == ["kserve", "mosec"]
    assert chosen_peers(["none"], smoke=False) == []


def test_the_report_judges_the_tail_of_predict_at_32_connections() -> None:
    """p99 <= 2x p50 and <= 50 ms (the performance issue): met, missed on the ratio, missed on the bound."""
    from bench.loadgen import LoadResult
    from bench.report import targets

    def verdict(p50: float, p99: float) -> list[str]:
        run = LoadResult(name="predict wine c=32", mode="closed", concurrency=32, rate=None, requests=1000,
                         duration_s=1.0, statuses={"2xx": 1000}, latency_ms={50: p50, 99: p99},
                         generator_cpu=0.5, extra={"server": "bundle"})
        return next(row for row in targets([run], [], None, {}) if row[0] == "/predict tail at 32 connections")

    assert verdict(8.0, 15.0)[-1] == "met" and "1.88x p50" in verdict(8.0, 15.0)[2]
    assert verdict(8.0, 17.0)[-1] == "MISSED"
    assert verdict(30.0, 55.0)[-1] == "MISSED"


@pytest.mark.parametrize(("text", "says"), [
    ("not json", "not JSON"),
    ('["on", "off"]', "an object of config.yaml overrides"),
    ('{"on": {}, "off": {"service": {"pin_worker": false}}}', "configuration 'off'"),
    ('{"on": {}, "off": {"service": 3}}', "configuration 'off': service: expected a mapping"),
])
def test_the_interleaved_bench_refuses_a_bad_configuration_before_starting_any_server(text: str, says: str) -> None:
    import argparse

    from bench.interleaved import configurations

    with pytest.raises(argparse.ArgumentTypeError, match=says):
        configurations(text)
    assert configurations('{"on": {}, "off": {"store": {"log_predictions": false}}}')["off"] == {
        "store": {"log_predictions": False}}


def test_the_report_judges_the_log_by_the_median_of_its_interleaved_rounds() -> None:
    """Log on over off, round by round (runs seconds apart): the median of those ratios is the verdict,
    so a slow minute that both servers of a round share (the second round here) cancels out."""
    from bench.report import targets

    def verdict(pairs: list[tuple[int, int]]) -> list[str]:
        runs = [run for number, (off, on) in enumerate(pairs)
                for run in ({"round": number, "server": "log off", "req_s": off},
                            {"round": number, "server": "log on", "req_s": on})]
        return next(row for row in targets([], runs, None, {}) if row[0].startswith("prediction log on against off"))

    slow_minute = [(5000, 4800), (3000, 2880), (5200, 4990)]  # 0.96 each
    assert verdict(slow_minute)[-1] == "met" and "0.960x over 3 rounds (0.96-0.96)" in verdict(slow_minute)[2]
    assert verdict([(5000, 4600), (5000, 4900), (5000, 4650)])[-1] == "MISSED"  # median 0.93
    assert not any(row[0].startswith("prediction log") for row in targets([], [], None, {}))


def test_the_report_judges_the_spike_by_the_first_window_a_second_after_its_end() -> None:
    """The performance issue: p99 back under 50 ms within 1 s of the spike's end, and no errors."""
    from bench.report import targets
    from bench.spike import Spike

    def verdict(p99_at: dict[float, float], errors: int = 0) -> list[str]:
        rows = [{"from_end_s": at, "requests": 200, "non_200": errors if at == -1.0 else 0, "p50_ms": 3.0,
                 "p99_ms": p99} for at, p99 in p99_at.items()]
        return next(row for row in targets([], [], Spike(200.0, 5.0, 10.0, rows), {})
                    if row[0] == "p99 after a 5x spike of 10 s (from 200 req/s)")

    slow_end = {-1.0: 400.0, 0.0: 120.0, 1.0: 30.0, 2.0: 9.0}
    assert verdict(slow_end)[-1] == "met" and verdict(slow_end)[2].startswith("30.0 ms from 1 s after")
    assert verdict({-1.0: 40.0, 0.0: 20.0, 1.0: 60.0, 2.0: 9.0})[-1] == "MISSED"
    assert verdict(slow_end, errors=3)[-1] == "MISSED" and "3 errors" in verdict(slow_end, errors=3)[2]


def test_a_bad_scenarios_pattern_is_refused_with_the_option_named(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.__main__ import main

    with pytest.raises(SystemExit) as stopped:
        main(["--scenarios", "("])
    assert stopped.value.code == 2
    assert "--scenarios: not a regular expression (missing )" in capsys.readouterr().err
