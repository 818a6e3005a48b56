"""The prediction log writer's CPU a logged row: ``python -m bench.logwriter``.

In a server the writer's cost hides in the noise of wrk runs (single rounds spread 0.6-1.4x). Here it
is measured alone, as the workers pay it: ``--processes`` processes, each with its own
``Ledger`` on one fresh SQLite store, queue ``--rows`` one-row answers as ``/predict`` records them
(its request counter moving, so the running totals are copied as in a server), then flush, once
every ``--flush-ms`` as a server's writer does; the process CPU of ``--flushes`` flushes, divided by
the rows, is the cost a row. The first flush, which compiles the statements, is not counted.

``--trees`` compares checkouts (this one by default): every round runs each tree in turn, so a slow
minute of the machine falls on all of them. Prints the median a tree and writes ``logwriter.json``
into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["class_0", "class_1", "class_2"]  # the wine model's
FEATURES = 13
PREFILL_CHUNK = 10_000  # rows a prefilling insert


def writer(rows: int, flushes: int, flush_s: float, url: str) -> float:
    """One process's CPU a row over ``flushes`` flushes of ``rows`` queued answers, ``flush_s`` apart (µs)."""
    import numpy as np

    from common import metrics
    from common.config import Monitoring, Store
    from common.ids import Ids
    from experiments.ledger import Ledger
    from experiments.records import AnswerRecord

    # The writer thread never flushes by itself: the flushes below are the only ones, timed.
    ledger = Ledger(Store(flush_ms=10**9, queue_rows=10**9), url, {"wine": CLASSES}, Monitoring())
    log = ledger.log
    assert log is not None
    ids, inputs, rng = Ids(), np.zeros((1, FEATURES), np.float32), np.random.default_rng(0)
    served = metrics.REQUESTS.labels(model="wine", variant="onnx-v2", endpoint="/predict", outcome="ok",
                                     pinned="false", epoch="e1")

    def queue() -> None:
        for _ in range(rows):
            probabilities = rng.dirichlet(np.ones(len(CLASSES)), size=1).astype(np.float32)
            ledger.answer([AnswerRecord(
                served_at=time.time(), endpoint="/predict", model="wine", variant="onnx-v2",
                model_tag="wine_sklearn_onnx:v2", pinned=False, epoch="e1", latency_ms=1.2, api_key=None,
                prediction_ids=ids.take(1), client_ids=(None,), users=[(None, 1)], classes=CLASSES,
                probabilities=probabilities, predicted=probabilities.argmax(axis=1), inputs=inputs)])
            served.inc()

    queue()
    log._flush()
    used, start = 0.0, time.monotonic()
    for number in range(1, flushes + 1):
        queue()
        started = time.process_time()
        log._flush()
        used += time.process_time() - started
        time.sleep(max(start + number * flush_s - time.monotonic(), 0.0))
    status = log.status()
    if status["dropped"] or status["written"] < rows * (flushes + 1):  # a failing store would look cheap
        raise RuntimeError(f"the log wrote {status['written']} of {rows * (flushes + 1)} rows: {status}")
    return used / (rows * flushes) * 1e6


def prefill(url: str, rows: int) -> None:
    """The store as a server's after a while: ``rows`` logged predictions over the last day, a tenth
    with a client id, so that every index the log writes is as deep as it gets in service."""
    from experiments.store import ExperimentStore

    store, now = ExperimentStore.connect(url), time.time()
    for start in range(0, rows, PREFILL_CHUNK):
        store.insert_predictions([
            {"prediction_id": f"prefill-{i:x}", "client_id": f"client-{i}" if i % 10 == 0 else None,
             "served_at": now - 86_400 + i * 86_400 / rows, "model": "wine", "variant": "onnx-v2",
             "model_tag": "wine_sklearn_onnx:v2", "epoch": "e1", "endpoint": "/predict", "label": CLASSES[i % 3],
             "label_index": i % 3, "top_probability": 0.5, "probabilities": [0.5, 0.3, 0.2], "latency_ms": 1.0}
            for i in range(start, min(start + PREFILL_CHUNK, rows))])
    store.close()


def round_of(tree: Path, processes: int, rows: int, flushes: int, flush_ms: int, prefilled: int) -> list[float]:
    """``processes`` writers of ``tree``'s code on one fresh store (``prefilled`` rows in it): each one's
    µs a row."""
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        command = [sys.executable, __file__, "--writer", str(rows), str(flushes), str(flush_ms / 1000),
                   f"sqlite:///{folder}/store.sqlite"]
        # Migrated first, so that the writers start together on a ready store.
        subprocess.run([sys.executable, __file__, "--migrate", command[-1], str(prefilled)], env=env, check=True)
        children = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
        return [float(child.communicate()[0]) for child in children]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.logwriter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", nargs="+", type=Path, default=[ROOT], help="checkouts to compare")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--processes", type=int, default=2, help="writers on one store (a server's workers)")
    parser.add_argument("--rows", type=int, default=150, help="rows a flush (a worker at 1,500 req/s, 100 ms)")
    parser.add_argument("--flushes", type=int, default=100)
    parser.add_argument("--flush-ms", type=int, default=100, help="as store.flush_ms")
    parser.add_argument("--prefill", type=int, default=0, help="rows logged before the writers start")
    parser.add_argument("--out", type=Path, default=Path("bench/results/logwriter"))
    args = parser.parse_args(argv)
    runs: list[dict] = []
    with tqdm(total=args.rounds * len(args.trees), desc="log writer", unit="run") as bar:
        for number in range(args.rounds):
            for tree in args.trees:
                runs.append({"round": number, "tree": str(tree),
                             "us_a_row": round_of(tree, args.processes, args.rows, args.flushes, args.flush_ms,
                                                        args.prefill)})
                bar.update()
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {**vars(args), "trees": [str(tree) for tree in args.trees], "out": str(args.out)}
    (args.out / "logwriter.json").write_text(json.dumps({"settings": settings, "runs": runs}, indent=1))
    print("| tree | µs of CPU a logged row, median (each process's, every round) |\n| --- | --- |")
    for tree in args.trees:
        values = sorted(v for run in runs if run["tree"] == str(tree) for v in run["us_a_row"])
        print(f"| {tree} | {statistics.median(values):.1f} ({values[0]:.1f}-{values[-1]:.1f}) |")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--writer"]:
        print(writer(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]))
    elif sys.argv[1:2] == ["--migrate"]:
        prefill(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(main())
