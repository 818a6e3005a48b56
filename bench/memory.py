"""What each runtime costs a worker in memory: its library imported, then each of its stored models loaded
and called once, each runtime in a fresh process (an import cannot be undone).

Anonymous memory is what every worker pays again when BentoML starts workers as new processes
(``service.fork_workers: false``); forked workers (the default, ``serving/prefork.py``) share the imports'
part until they write to it. File-backed memory (the libraries' code) is shared through the page cache by
every worker of the machine. ``python -m bench.memory`` prints the table; ``python -m bench`` puts it in
its report.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from common import datasets, store
from common.tables import markdown as table

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "(interpreter, numpy, BentoML, the runtime interface, the test splits: scikit-learn, SciPy, pandas)"
MIB = 1024


@dataclass
class MemoryStep:
    runtime: str
    step: str
    """``import`` (the runtime's library), or the tag of a model loaded and called once."""
    anon_mib: float
    file_mib: float


def _rss() -> tuple[float, float]:
    """This process's resident anonymous and file-backed memory, MiB (Linux ``/proc/self/status``)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["RssAnon"].split()[0]) / MIB, int(fields["RssFile"].split()[0]) / MIB


def _measure(runtime: str, tags: list[str]) -> list[MemoryStep]:
    """In this (fresh) process: the baseline, the runtime's import, each model loaded and called once."""
    import gc
    import importlib

    from runtimes import load_runtime

    steps = []
    last = (0.0, 0.0)  # the baseline step is absolute, the others what they added

    def step(name: str) -> None:
        nonlocal last
        gc.collect()
        now = _rss()
        steps.append(MemoryStep(runtime, name, now[0] - last[0], now[1] - last[1]))
        last = now

    # Every worker loads its models' test splits to check them (serving/repository.py), which imports
    # scikit-learn: counted once here, not in whichever runtime happens to load a split first.
    splits = {tag: datasets.load(store.get(tag).info.labels["family"]).x_test[:1] for tag in tags}
    step(BASELINE)
    importlib.import_module(f"runtimes.{runtime}")
    step("import")
    for tag in tags:
        model = store.get(tag)
        loaded = load_runtime(model, threads=1)
        loaded.predict(splits[tag])
        step(tag)
    return steps


def run() -> list[MemoryStep]:
    """Every runtime of the stored classification models, each measured in a process of its own."""
    by_runtime: dict[str, list[str]] = defaultdict(list)
    for model in store.list_models(task="classification"):
        by_runtime[model.info.labels["runtime"]].append(str(model.tag))
    steps: list[MemoryStep] = []
    for runtime, tags in tqdm(sorted(by_runtime.items()), desc="runtime memory", unit="runtime"):
        child = subprocess.run([sys.executable, "-m", "bench.memory", "--child", runtime, *tags], cwd=ROOT,
                               capture_output=True, text=True, check=True)
        steps += [MemoryStep(**row) for row in json.loads(child.stdout.strip().splitlines()[-1])]
    return steps


def rows(steps: list[MemoryStep]) -> list[list]:
    """One row per runtime: the baseline once, the import, the models together, and the total."""
    out = []
    for runtime in dict.fromkeys(s.runtime for s in steps):
        mine = [s for s in steps if s.runtime == runtime]
        models = [s for s in mine if s.step not in (BASELINE, "import")]
        imported = next(s for s in mine if s.step == "import")
        out.append([runtime, f"{imported.anon_mib:.0f}", f"{imported.file_mib:.0f}", len(models),
                    f"{sum(s.anon_mib for s in models):.0f}", f"{imported.anon_mib + sum(s.anon_mib for s in models):.0f}"])
    baseline = [s for s in steps if s.step == BASELINE]
    if baseline:
        out.append(["(every worker) " + BASELINE, f"{min(s.anon_mib for s in baseline):.0f}",
                    f"{min(s.file_mib for s in baseline):.0f}", "", "", f"{min(s.anon_mib for s in baseline):.0f}"])
    return out


HEADERS = ["runtime", "import: anonymous MiB", "import: file MiB (shared)", "models", "models: anonymous MiB",
           "per worker: anonymous MiB"]


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        print(json.dumps([s.__dict__ for s in _measure(argv[1], argv[2:])]))
        return 0
    print(table(HEADERS, rows(run())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
