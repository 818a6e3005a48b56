"""serving/prefork.py with real processes: a supervisor forks workers, replaces one that dies, stops them
with itself, and gives up on workers that fail to start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests import ROOT

WORKER = """
import os, sys, time
from pathlib import Path
import json
from prometheus_client import Gauge
from serving import prefork
prefork.supervise(2, lambda: None, json.loads(sys.argv[3]))
Gauge("probe", "a live gauge, in a file of this worker's", multiprocess_mode="livemin").set(1)
folder, fail = sys.argv[1], sys.argv[2] == "fail"
Path(folder, str(os.getpid())).write_text(str(os.getppid()))
if fail:
    sys.exit(3)
while True:
    time.sleep(0.05)
"""
WAIT_S = 10
"""Seconds: the scripts above start in well under one."""


def start(folder: Path, mode: str = "serve", cpus: list[int] | None = None) -> subprocess.Popen:
    """Workers that write their pids into ``folder`` and their metrics into its sibling ``metrics``, on
    ``cpus`` (``prefork.placement``) when given."""
    metrics = folder.parent / "metrics"
    metrics.mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-c", WORKER, str(folder), mode, json.dumps(cpus)], cwd=ROOT,
                            env={"PYTHONPATH": str(ROOT), "PROMETHEUS_MULTIPROC_DIR": str(metrics)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def workers(folder: Path, count: int) -> list[int]:
    """The pids of the first ``count`` workers that started (each writes a file named by its pid)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        started = sorted(folder.iterdir(), key=lambda f: f.stat().st_mtime)
        if len(started) >= count:
            return [int(f.name) for f in started[:count]]
        time.sleep(0.05)
    raise AssertionError(f"{len(list(folder.iterdir()))} of {count} workers started")


@pytest.fixture
def group(tmp_path: Path):
    folder = tmp_path / "workers"
    folder.mkdir()
    supervisor = start(folder)
    yield supervisor, folder
    if supervisor.poll() is None:
        supervisor.kill()
        supervisor.wait()


def test_workers_are_forked_by_the_supervisor_and_one_that_dies_is_replaced_and_forgotten(group) -> None:
    supervisor, folder = group
    first = workers(folder, 2)
    assert all(psutil.Process(pid).ppid() == supervisor.pid for pid in first)
    os.kill(first[0], signal.SIGKILL)
    third = workers(folder, 3)[2]
    assert psutil.Process(third).ppid() == supervisor.pid
    assert {p.pid for p in psutil.Process(supervisor.pid).children()} == {first[1], third}
    # the dead worker's live gauges are dropped, so that a livemin gauge is not pinned by a worker gone
    live = {int(f.stem.rsplit("_", 1)[1]) for f in (folder.parent / "metrics").glob("gauge_livemin_*.db")}
    assert live == {first[1], third}


def test_a_stop_signal_stops_every_worker_and_the_supervisor_exits_cleanly(group) -> None:
    supervisor, folder = group
    pids = workers(folder, 2)
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(WAIT_S) == 0
    assert not any(psutil.pid_exists(pid) for pid in pids)


def test_workers_stop_when_their_supervisor_is_killed(group) -> None:
    supervisor, folder = group
    pids = workers(folder, 2)
    supervisor.kill()
    supervisor.wait()
    _, alive = psutil.wait_procs([psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)], timeout=WAIT_S)
    assert not alive


def test_workers_that_fail_to_start_stop_the_group_with_their_exit_code(tmp_path: Path) -> None:
    folder = tmp_path / "workers"
    folder.mkdir()
    supervisor = start(folder, "fail")
    assert supervisor.wait(WAIT_S) == 3
    assert "worker failed to start" in supervisor.stderr.read().decode()


def test_reaping_skips_a_worker_reaped_already_and_waits_for_the_others() -> None:
    """A stop signal between the supervisor's wait and its bookkeeping leaves a reaped pid in its table:
    the stop must still wait for the live worker and return, not fail on the pid that is gone."""
    from serving import prefork

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped here: no longer a child of this process
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    children = {gone.pid: 0.0, live.pid: 0.0}
    started = time.monotonic()
    prefork._reap(children)
    assert children == {}
    assert time.monotonic() - started < prefork.STOP_GRACE_S  # it waited for the live one, then returned
    assert not psutil.pid_exists(live.pid)  # reaped by _reap, not left a zombie


def test_pinned_workers_each_run_on_their_slot_s_cpu_and_a_replacement_on_the_dead_one_s(tmp_path: Path) -> None:
    cpus = sorted(os.sched_getaffinity(0))[:2] * (1 if len(os.sched_getaffinity(0)) > 1 else 2)
    folder = tmp_path / "workers"
    folder.mkdir()
    supervisor = start(folder, cpus=cpus)
    try:
        first = workers(folder, 2)
        assert [os.sched_getaffinity(pid) for pid in first] in ([{cpus[0]}, {cpus[1]}], [{cpus[1]}, {cpus[0]}])
        assert os.sched_getaffinity(supervisor.pid) == os.sched_getaffinity(0)  # the parent stays free
        dead = os.sched_getaffinity(first[0])
        os.kill(first[0], signal.SIGKILL)
        third = workers(folder, 3)[2]
        assert os.sched_getaffinity(third) == dead
    finally:
        supervisor.kill()
        supervisor.wait()


@pytest.mark.parametrize(("workers_", "pin", "threads", "allowed", "expected"), [
    (2, "auto", 1, [0, 1], [0, 1]),  # 2 workers cover 2 CPUs: pinned
    (2, "auto", 1, [2, 5], [2, 5]),  # a cpuset's CPUs, whatever their numbers
    (4, "auto", 1, [0, 1], [0, 1, 0, 1]),  # more workers than CPUs: round robin
    (2, "auto", 1, list(range(16)), None),  # fewer workers than CPUs: left to the scheduler
    (2, "auto", 2, [0, 1], None),  # runtime calls of 2 threads each: one core would serialize them
    (2, True, 1, list(range(16)), [0, 1]),  # always
    (2, False, 1, [0, 1], None),  # never
])
def test_the_placement_pins_only_when_the_workers_cover_the_cpus_or_when_asked(
        workers_: int, pin: bool | str, threads: int, allowed: list[int], expected: list[int] | None) -> None:
    from serving import prefork

    assert prefork.placement(workers_, pin, threads, allowed) == expected
