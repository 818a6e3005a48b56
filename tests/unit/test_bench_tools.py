"""Issue: performance. The spike benchmark's schedule and windows, and its refusal of a load that
could not test anything (the benchmark itself runs against real servers: ``python -m bench.spike``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench import spike
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
