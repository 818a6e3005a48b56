"""Where the server's memory goes: what each of its processes loads, and what the workers share; and
where its workers run."""

from __future__ import annotations

import os

import psutil

from common import config
from harness.server import ServerProcess
from serving import prefork

SHARED_MIB = 200
"""Each forked worker shares at least this much written memory (the runtimes' imports) with its parent
and sibling (~500 MiB measured); a worker BentoML starts as a new process shares none."""
MODEL_LIBRARIES = ("torch", "tensorflow", "onnxruntime", "sklearn", "scipy", "pandas", "pyarrow")
"""Packages whose shared objects show, in a process's memory maps, that it imported them."""


def loaded(process: psutil.Process) -> set[str]:
    """The packages of ``MODEL_LIBRARIES`` with a shared object mapped into ``process``."""
    paths = [m.path for m in process.memory_maps(grouped=True)]
    return {name for name in MODEL_LIBRARIES if any(f"/site-packages/{name}/" in path for path in paths)}


def test_the_main_process_imports_no_model_library(server: ServerProcess) -> None:
    """BentoML's main process imports ``service`` to read its configuration and never answers: a library
    imported at module level there is memory held for nothing (scikit-learn with SciPy and pandas was
    ~85 MiB of its ~180). The workers load what the default experiments use."""
    assert loaded(psutil.Process(server.process.pid)) == set()
    for worker in server.workers():
        assert {"torch", "tensorflow", "onnxruntime", "sklearn", "scipy"} <= loaded(worker)


def test_the_workers_are_forked_after_the_imports_and_share_them(server: ServerProcess) -> None:
    """``service.fork_workers`` (on by default): BentoML's one worker process imports the runtimes and forks
    the configured workers, whose written pages stay shared until one of them writes to them."""
    workers = server.workers()
    assert len(workers) == 2
    parents = {worker.ppid() for worker in workers}
    assert len(parents) == 1
    parent = psutil.Process(parents.pop())
    assert "_bentoml_impl.worker" in " ".join(parent.cmdline()) and parent.ppid() == server.process.pid
    assert {"torch", "tensorflow", "onnxruntime", "sklearn"} <= loaded(parent)
    for worker in workers:
        assert shared_written_mib(worker) >= SHARED_MIB


def test_the_workers_run_where_the_placement_puts_them(server: ServerProcess) -> None:
    """``service.pin_workers: auto`` (the default): on a machine whose CPUs the 2 workers cover (the 2-core
    test machines), every thread of each worker runs on a CPU of its own, one per worker; elsewhere the
    workers are left to the scheduler."""
    settings = config.load().service
    cpus = prefork.placement(settings.worker_count(), settings.pin_workers, settings.intra_op_threads)
    placed = sorted({frozenset(os.sched_getaffinity(thread.id)) for thread in worker.threads()}
                    for worker in server.workers())
    if cpus is None:
        assert placed == [{frozenset(os.sched_getaffinity(0))}] * 2, placed
    else:
        assert placed == sorted({frozenset({cpu})} for cpu in cpus), placed


def shared_written_mib(process: psutil.Process) -> float:
    """Written (dirty) memory of ``process`` that another process maps too: after a fork, until written."""
    with open(f"/proc/{process.pid}/smaps_rollup") as rollup:
        fields = dict(line.split(":", 1) for line in rollup if ":" in line)
    return int(fields["Shared_Dirty"].split()[0]) / 1024
