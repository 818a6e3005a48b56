"""Issue: layout. Imports run one way (common <- runtimes <- experiments <- serving <- protocols <-
service.py), the tools around the product stay out of it, and the check names an offending import.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import runtimes
from tests import ROOT

PACKAGES = ("common", "runtimes", "experiments", "serving", "protocols", "training", "conversion", "bench",
            "harness", "tests", "batch")


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache"], cwd=tree,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree)}, capture_output=True, text=True,
                          timeout=120)


def test_imports_run_one_way() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 kept, 0 broken" in done.stdout


def test_a_wrong_way_import_is_named(tmp_path: Path) -> None:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "results"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copy(ROOT / "service.py", tmp_path)
    with open(tmp_path / "common" / "errors.py", "a") as upward:
        upward.write("\nfrom protocols import rest  # noqa: E402,F401\n")
    with open(tmp_path / "serving" / "types.py", "a") as to_service:
        to_service.write("\nimport service  # noqa: E402,F401\n")
    done = lint_imports(tmp_path)
    assert done.returncode == 1
    assert "common.errors -> protocols.rest" in done.stdout
    assert "serving.types -> service" in done.stdout


def test_runtimes_are_found_by_module_name_without_importing_them() -> None:
    assert runtimes.available() == ["onnxruntime", "sklearn", "tensorflow", "torch"]
    assert fresh_interpreter("import sys, runtimes; runtimes.available();"
                             "print(sorted(m for m in ('torch', 'tensorflow', 'onnxruntime', 'sklearn') if m in sys.modules))"
                             ) == "[]"


def test_the_sklearn_runtime_leaves_torch_unimported() -> None:
    """skops walks every scikit-learn package when imported, torch's array-API adapter included: the runtime
    keeps that one import from happening, and leaves the adapter importable afterwards."""
    assert fresh_interpreter("import sys, runtimes.sklearn as r; "
                             "print('torch' in sys.modules, r.ARRAY_API_TORCH in sys.modules, 'skops.io' in sys.modules)"
                             ) == "False False True"


def fresh_interpreter(code: str) -> str:
    """What ``code`` prints in a new interpreter: modules imported by an earlier test do not count."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()
