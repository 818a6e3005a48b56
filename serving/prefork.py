"""Workers forked after the model libraries are imported, so that their memory is shared.

BentoML starts each worker as a new process (``python -m _bentoml_impl.worker.service``), and a new
process imports TensorFlow, torch, scikit-learn and onnxruntime again: ~450 MiB of anonymous memory per
worker that no other worker can share (docs/performance.md, "Memory per runtime"). With
``service.fork_workers``, BentoML starts one process; when it imports the service, that process imports
the runtimes the configuration uses, freezes the garbage collector's view of those objects (so that a
collection does not write to, and copy, every shared page) and forks ``service.workers`` workers, which
return from the import and serve on BentoML's listening socket as BentoML's own workers would. The
parent supervises: it forwards BentoML's stop signal, and forks a new worker when one dies. With
``service.pin_workers``, each worker runs on a CPU of its own (:func:`placement`).

The parent never runs a model nor starts a thread of its own, which is what makes forking again later as
safe as the first fork. gunicorn's ``--preload`` is the same design; BentoML has no such option. Libraries
do start native threads at import: OpenBLAS's pool (numpy) and jemalloc's background thread (pyarrow,
TensorFlow) are in the parent; both register fork handlers, as fork-preloading servers rely on.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Collection
from typing import Literal

from prometheus_client import multiprocess

from common.logs import get_logger
from common.metrics import MULTIPROC_ENV

log = get_logger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
PR_SET_PDEATHSIG = 1
"""prctl(2): the signal a process gets when its parent dies (Linux); the standard library has no prctl."""
EARLY_EXIT_S = 60.0
"""A worker that exits with an error sooner than this after its fork failed to start (a missing model, a
port in use): the parent exits with its code and lets BentoML's supervisor restart the whole group,
instead of forking into the same failure. A worker killed by a signal (the OOM killer) is replaced."""
RESPAWN_INTERVAL_S = 1.0
"""At most one replacement worker a second: a worker that crashes at once does not spin the parent."""
STOP_GRACE_S = 30.0
"""After forwarding a stop signal, how long the parent waits for its workers before killing them."""


class _Stop(Exception):
    """BentoML's supervisor asked this group to stop: the wait for workers is interrupted."""


def placement(workers: int, pin: bool | Literal["auto"], intra_op_threads: int,
              allowed: Collection[int] | None = None) -> list[int] | None:
    """The CPU of each worker slot, or None to leave the workers to the scheduler.

    A worker's threads (event loop, runtime calls, log writer) hand work to each other many times a
    request: on one core those hand-offs stay in its caches. On 2 cores with 2 workers, pinned workers
    answered 4-10% more requests, for 2-8% less CPU each (docs/performance.md, "Workers pinned to cores").
    ``auto`` pins only when every CPU this process may use (``allowed``: its affinity, which a container's
    cpuset or Kubernetes' static CPU manager sets) gets a worker and each runtime call uses one thread: a
    worker pinned among more CPUs than workers would share its core with whatever else runs there."""
    cpus = sorted(os.sched_getaffinity(0) if allowed is None else allowed)
    if pin is False or (pin == "auto" and (workers < len(cpus) or intra_op_threads > 1)):
        return None
    return [cpus[slot % len(cpus)] for slot in range(workers)]


def supervise(workers: int, prepare: Callable[[], None], cpus: list[int] | None = None,
              listen: Callable[[], list[socket.socket]] | None = None) -> list[socket.socket]:
    """Run ``prepare`` (the imports to share), fork ``workers`` workers and return in each of them; the
    calling process stays their parent until they have all stopped, then exits (it never returns).
    ``cpus`` (:func:`placement`): worker slot ``i`` runs on ``cpus[i]``, and a replacement on its slot's.
    ``listen``: called before each fork; the sockets it makes are the new worker's (returned to it), and
    the parent closes its copies. Every worker's listeners then exist before any worker starts."""
    prepare()
    gc.collect()
    gc.freeze()
    parent = os.getpid()
    original = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    children: dict[int, float] = {}
    slots: dict[int, int] = {}
    sockets: list[socket.socket] = []

    def spawn(slot: int) -> bool:
        """True in the new worker, which must return to serve (its listeners in ``sockets``). Stop
        signals wait while it forks: the parent's handler must not run in the child before the child
        has its own, nor in the parent before the child is in ``children``."""
        sockets[:] = listen() if listen is not None else []
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                for number, handler in original.items():
                    signal.signal(number, handler)
                _die_with(parent)
                if cpus is not None:  # before any thread starts: every thread of the worker inherits it
                    os.sched_setaffinity(0, {cpus[slot]})
                return True
            children[pid], slots[pid] = time.monotonic(), slot
            for sock in sockets:  # the worker's now; the next worker must not inherit them
                sock.close()
            return False
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def stop(number: int, _frame: object) -> None:
        for each in STOP_SIGNALS:  # once: a second signal must not interrupt the wait below
            signal.signal(each, signal.SIG_IGN)
        for pid in children:
            _signal(pid, number)
        raise _Stop

    # Before the first fork: a stop signal that lands while the workers start stops the ones started
    # (it killed the parent, and them through _die_with, with the signal's exit status instead of 0).
    for number in STOP_SIGNALS:
        signal.signal(number, stop)
    try:
        for slot in range(workers):
            if spawn(slot):
                return sockets
        log.info("workers forked after imports", extra={"workers": sorted(children), "parent": parent, "cpus": cpus})
        while children:
            pid, status = os.waitpid(-1, 0)
            started = children.pop(pid, None)
            if started is None:
                continue
            slot = slots.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            if code > 0 and time.monotonic() - started < EARLY_EXIT_S:
                log.error("worker failed to start; stopping its group", extra={"pid": pid, "exit_code": code})
                for other in children:
                    _signal(other, signal.SIGTERM)
                _reap(children)
                os._exit(code)
            _forget(pid)
            log.warning("worker exited; forking a new one", extra={"pid": pid, "exit_code": code})
            time.sleep(max(0.0, started + RESPAWN_INTERVAL_S - time.monotonic()))
            if spawn(slot):
                return sockets
    except _Stop:
        _reap(children)
    os._exit(0)


def _reap(children: dict[int, float]) -> None:
    """Wait for the workers to stop, then kill what is left after ``STOP_GRACE_S``. A worker reaped
    already (the stop signal can land between the main loop's wait and its bookkeeping) is no longer
    a child: it is dropped, not waited for."""
    deadline = time.monotonic() + STOP_GRACE_S
    while children and time.monotonic() < deadline:
        for pid in list(children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                children.pop(pid)
        if children:
            time.sleep(0.1)
    for pid in children:
        _signal(pid, signal.SIGKILL)


def _forget(pid: int) -> None:
    """Drop a dead worker's live gauges (``bundle_experiment_version``'s oldest version in force must not
    stay pinned by a worker that is gone)."""
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        multiprocess.mark_process_dead(pid, directory)


def _signal(pid: int, number: int) -> None:
    try:
        os.kill(pid, number)
    except ProcessLookupError:
        pass


def _die_with(parent: int) -> None:
    """Stop this worker when the parent dies (killed by BentoML's supervisor, or by the OOM killer):
    BentoML starts a new parent, which forks new workers; an orphan would keep serving outside it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(0)
