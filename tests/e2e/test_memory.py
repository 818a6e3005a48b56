"""Where the server's memory goes: what each of its processes loads."""

from __future__ import annotations

import psutil

from harness.server import ServerProcess

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
