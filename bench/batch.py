"""Offline batch scoring against the online service: ``python -m bench.batch [--rows N] [--spark]``.

Rows/s of ``python -m batch`` (in this process, ``batch.job.run``) per model and variant (sklearn and
ONNX wine, TF and INT8 cancer, torch and INT8 digits), each with every core used both ways: one process
whose runtimes use one thread per core (the models loaded before the clock starts by a warm-up job), and
one worker process per core (their start-up and model loading on the clock). Beside them, the online
service's best single-row rate from the latest ``bench/results/*/results.json`` (the issue's bar: batch
>= 10x online). ``--spark`` adds Spark ``local[*]`` on the same wine file. Writes
``bench/results/<date>/batch.md`` and ``batch.png``.

``--memory`` measures instead the peak memory of one job: ``python -m batch wine users.csv
scores.parquet --id-column user`` on a CSV of ``--rows`` real wine rows, each with its own user id
(sticky by user, unless ``--variant``; ``--workers`` as the command's), started as a process of its own.
Two figures: the peak of the summed RSS of the job's process tree (the job and its pool workers; psutil,
sampled every ``RSS_EVERY_S``) and the largest single process's exact peak
(``getrusage(RUSAGE_CHILDREN).ru_maxrss``, kept by the kernel). Appends a row to
``bench/results/<date>/batch-memory.md``.

``--online-while-job`` measures what a batch job costs the online service: single-row ``/predict``
latency (open loop, p50/p99) on a real server, first idle, then while jobs submitted to
``/score_file/submit`` run; writes ``bench/results/<date>/batch-online.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import matplotlib
import psutil
import pyarrow as pa
import pyarrow.csv as pacsv

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from batch.job import Job, run
from batch.scoring import Scorer, feature_columns
from bench import loadgen, scenarios
from common import config, datasets
from harness.server import ServerProcess, isolated_home

RESULTS = Path(__file__).resolve().parent / "results"
CASES = (("wine", "sklearn-v1"), ("wine", "onnx-v2"), ("cancer", "tf-v1"), ("cancer", "onnx-int8-v2"),
         ("digits", "torch-v1"), ("digits", "onnx-int8-v2"))
ROWS = 1_000_000
WARM_ROWS = 1_000
"""The warm-up job: loads every runtime before the measured job (in-process runs only)."""
TARGET_RATIO = 10
ROOT = Path(__file__).resolve().parent.parent
ONLINE_RATE = 100.0
"""Single-row /predict requests per second, on schedule: far below the service's capacity (~3,000/s),
so the latency shows what the job takes from it, not saturation."""
ONLINE_SECONDS = 20.0
JOB_ROWS = 80_000
"""Wine rows (with a user id) per submitted job: a CSV just under limits.max_body_bytes."""
JOBS = 8
"""Jobs submitted at once; batch.max_jobs (1) runs them one after the other, through the window."""
STATUS_POLL_S = 1.0
RSS_EVERY_S = 0.2
"""How often the job's process tree is sampled by ``--memory``."""
CSV_BLOCK_ROWS = 1_000_000
"""Rows ``--memory`` writes to its input at a time."""
MIB = 2 ** 20


def make_input(model: str, rows: int, destination: Path) -> Path:
    """Real rows of the model's dataset, drawn with replacement, in the model's columns."""
    data = datasets.load(model)
    x = np.concatenate([data.x_train, data.x_test]).reshape(-1, int(np.prod(data.input_shape)))
    schema = Scorer(model, config.load()).schema
    frame = pd.DataFrame(x[np.random.default_rng(0).integers(0, len(x), rows)], columns=feature_columns(schema))
    frame.to_parquet(destination, index=False)
    return destination


def measure(model: str, variant: str, source: Path, folder: Path, workers: int, threads: int = 1) -> float:
    """Rows/s of one job, the clock including worker start-up and model loading when ``workers`` > 1."""
    if workers == 1:
        run(Job(model, str(source), folder / "warm.parquet", variant=variant, workers=1, chunk_rows=WARM_ROWS,
                threads=threads), progress=False)
    summary = run(Job(model, str(source), folder / f"{model}-{variant}.parquet", variant=variant, workers=workers,
                      threads=threads), progress=False)
    return summary.rows_per_s


def make_users_csv(rows: int, destination: Path) -> Path:
    """Real wine rows drawn with replacement, each with its own user id (``user``), written a block at a time."""
    data = datasets.load("wine")
    x = np.concatenate([data.x_train, data.x_test])
    rng = np.random.default_rng(0)
    writer = None
    try:
        for start in range(0, rows, CSV_BLOCK_ROWS):
            count = min(CSV_BLOCK_ROWS, rows - start)
            picked = x[rng.integers(0, len(x), count)]
            table = pa.table({"user": [f"user-{i}" for i in range(start, start + count)],
                              **{name: picked[:, j] for j, name in enumerate(data.feature_names)}})
            writer = writer or pacsv.CSVWriter(destination, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    return destination


def peak_memory(rows: int, variant: str | None, workers: int, folder: Path) -> Path:
    """One job's rows/s and peak RSS (see the module docstring), appended to ``batch-memory.md``."""
    source = make_users_csv(rows, folder / "users.csv")
    options = ["--id-column", "user", "--workers", str(workers), *(["--variant", variant] if variant else [])]
    summary_path, log = folder / "summary.json", folder / "stderr.txt"
    with open(log, "w") as stderr:
        job = psutil.Popen([sys.executable, "-m", "batch", "wine", str(source), str(folder / "scores.parquet"),
                            *options, "--summary-json", str(summary_path)], cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=stderr, env={**os.environ, "PYTHONPATH": str(ROOT)})
        tree_peak = 0
        while job.poll() is None:
            total = 0
            for process in (job, *job.children(recursive=True)):
                try:
                    total += process.memory_info().rss
                except psutil.NoSuchProcess:  # a worker that ended between listing and reading
                    pass
            tree_peak = max(tree_peak, total)
            time.sleep(RSS_EVERY_S)
    if job.returncode:
        raise SystemExit(f"the job failed ({job.returncode}):\n{log.read_text()[-3000:]}")
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    summary = json.loads(summary_path.read_text())
    shares = ", ".join(f"{name} {count:,}" for name, count in sorted(summary["variants"].items()))
    assignment = f"fixed `--variant {variant}`" if variant else "sticky by `user`"
    folder_out = RESULTS / datetime.date.today().isoformat()
    folder_out.mkdir(parents=True, exist_ok=True)
    report = folder_out / "batch-memory.md"
    if not report.exists():
        report.write_text("# Peak memory of one batch job (wine CSV with a user id column)\n\n"
                          "Tree: the peak of the summed RSS of the job and its workers (psutil, every "
                          f"{RSS_EVERY_S:g} s). Largest process: its exact peak (getrusage RUSAGE_CHILDREN "
                          "ru_maxrss). Start-up and model loading included.\n\n"
                          "| rows | CSV | assignment | workers | rows/s | variants | peak RSS, tree | "
                          "peak RSS, largest process | command |\n|---|---|---|---|---|---|---|---|---|\n")
    line = (f"| {rows:,} | {source.stat().st_size / MIB:,.0f} MiB | {assignment} | {workers} | "
            f"{summary['rows_per_s']:,.0f} | {shares} | {tree_peak / MIB:,.0f} MiB | {largest / MIB:,.0f} MiB | "
            f"`python -m bench.batch --memory --rows {rows}" + (f" --variant {variant}" if variant else "")
            + (f" --workers {workers}" if workers != 1 else "") + "` |\n")
    with open(report, "a") as stream:
        stream.write(line)
    print(f"python -m batch wine users.csv scores.parquet {' '.join(options)}\n{line}", flush=True)
    return report


def online_best() -> dict[str, float]:
    """Per model, the best single-row ``/predict`` rate (rows/s) of the latest full benchmark that has one."""
    for results in sorted(RESULTS.glob("*/results.json"), reverse=True):
        best: dict[str, float] = {}
        for r in json.loads(results.read_text()).get("http", []):
            words = r["name"].split()
            if r["mode"] == "closed" and r["extra"].get("server") == "bundle" and words[0] == "predict" \
                    and r["extra"].get("path") == "/predict" and r["duration_s"]:
                best[words[1]] = max(best.get(words[1], 0.0), r["requests"] / r["duration_s"])
        if best:
            return best
    return {}


def online_while_job(store: Path, folder: Path) -> Path:
    """/predict latency idle and while ``JOBS`` jobs run in the server (``batch/task.py``)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENTOML_HOME": str(isolated_home(store, folder))}
    server = ServerProcess("service:Bundle", ROOT, env, folder)
    try:
        body = scenarios.bodies()["predict-wine"]
        url = f"{server.url}/predict"
        idle = loadgen.open_loop("idle", url, body, ONLINE_RATE, ONLINE_SECONDS)
        data = datasets.load("wine")
        frame = pd.DataFrame(data.x_test[np.random.default_rng(0).integers(0, len(data.x_test), JOB_ROWS)],
                             columns=data.feature_names)
        frame.insert(0, "user", [f"user-{i}" for i in range(JOB_ROWS)])
        upload = frame.to_csv(index=False).encode()
        with httpx.Client(base_url=server.url, timeout=60) as client:
            tasks = [client.post("/score_file/submit", data={"model": "wine", "id_column": "user"},
                                 files={"file": ("users.csv", upload, "text/csv")}).json()["task_id"]
                     for _ in range(JOBS)]
            busy = loadgen.open_loop("job running", url, body, ONLINE_RATE, ONLINE_SECONDS)
            at_end = [client.get("/score_file/status", params={"task_id": t}).json()["status"] for t in tasks]
            while "in_progress" in (final := [client.get("/score_file/status", params={"task_id": t}).json()["status"]
                                              for t in tasks]):
                time.sleep(STATUS_POLL_S)
    finally:
        server.stop()
    title = (f"# Online /predict latency while batch jobs run ({ONLINE_RATE:g} requests/s on schedule, "
             f"{ONLINE_SECONDS:g} s each)")
    setup = (f"{JOBS} jobs of {JOB_ROWS:,} wine rows (sticky by user) submitted to /score_file/submit, "
             f"batch.max_jobs 1, batch.threads 1, 2 workers. Jobs still in progress at the end of the window: "
             f"{at_end.count('in_progress')} of {JOBS}; final statuses {final}.")
    lines = [title, "", setup, "",
             "| window | requests | non-2xx | p50 ms | p90 ms | p99 ms |", "|---|---|---|---|---|---|"]
    for result in (idle, busy):
        lines.append(f"| {result.name} | {result.requests} | {result.non_2xx} | {result.latency_ms[50]:.1f} | "
                     f"{result.latency_ms[90]:.1f} | {result.latency_ms[99]:.1f} |")
    report_folder = RESULTS / datetime.date.today().isoformat()
    report_folder.mkdir(parents=True, exist_ok=True)
    (report_folder / "batch-online.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return report_folder


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(prog="python -m bench.batch", description=__doc__.splitlines()[0])
    cli.add_argument("--rows", type=int, default=ROWS)
    cli.add_argument("--spark", action="store_true")
    cli.add_argument("--models", nargs="*", default=sorted({m for m, _ in CASES}), help="the models to measure")
    cli.add_argument("--online-while-job", action="store_true", help="measure /predict latency while jobs run")
    cli.add_argument("--memory", action="store_true", help="the peak RSS of one wine job of --rows rows instead")
    cli.add_argument("--variant", help="--memory: one fixed variant (default: sticky by user)")
    cli.add_argument("--workers", type=int, default=1, help="--memory: the job's --workers")
    args = cli.parse_args(argv)
    if args.memory:
        with tempfile.TemporaryDirectory() as tmp:
            peak_memory(args.rows, args.variant, args.workers, Path(tmp))
        return 0
    if args.online_while_job:
        with tempfile.TemporaryDirectory() as tmp:
            online_while_job(Path(os.environ.get("BENTOML_HOME", ROOT / ".bentoml")), Path(tmp))
        return 0
    cores = os.cpu_count() or 1
    table: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for model, variant in (c for c in CASES if c[0] in args.models):
            source = folder / f"{model}.parquet"
            if not source.exists():
                make_input(model, args.rows, source)
            for workers, threads, how in ((cores, 1, f"{cores} processes"), (1, cores, f"1 process, {cores} threads")):
                rate = measure(model, variant, source, folder, workers, threads)
                table.append((f"{model} {variant}, {how}", rate))
                print(f"{table[-1][0]}: {rate:,.0f} rows/s", flush=True)
        if args.spark:
            from pyspark.sql import SparkSession

            from batch import spark as on_spark

            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
            session = SparkSession.builder.master("local[*]").appName("bench-batch").getOrCreate()
            started = time.perf_counter()
            source = folder / "wine.parquet"
            if not source.exists():
                make_input("wine", args.rows, source)
            result = on_spark.run(session, "wine", str(source), str(folder / "spark"),
                                  variant="onnx-v2")
            seconds = time.perf_counter() - started
            session.stop()
            table.append((f"wine onnx-v2, Spark local[{cores}]", sum(result["variants"].values()) / seconds))
            print(f"{table[-1][0]}: {table[-1][1]:,.0f} rows/s", flush=True)
    write_report(table, online_best(), args.rows)
    return 0


def write_report(table: list[tuple[str, float]], online: dict[str, float], rows: int) -> Path:
    folder = RESULTS / datetime.date.today().isoformat()
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"# Batch scoring: {rows:,} rows per file, Parquet in and out", "",
             "Online: the best single-row /predict rate of the latest `python -m bench` (per model); "
             f"the issue's bar is {TARGET_RATIO}x that.", "",
             "| job | rows/s | online rows/s | x online |", "|---|---|---|---|"]
    for name, rate in table:
        base = online.get(name.split()[0])
        lines.append(f"| {name} | {rate:,.0f} | " + (f"{base:,.0f} | {rate / base:.1f}x |" if base else "| |"))
    (folder / "batch.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(table) + 1.5))
    ax.barh([n for n, _ in table], [r for _, r in table])
    if online:
        ax.axvline(max(online.values()) * TARGET_RATIO, color="red", linestyle="--",
                   label=f"{TARGET_RATIO}x the best online single-row rate")
        ax.legend()
    ax.set_xlabel("rows/s")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(folder / "batch.png", dpi=110)
    plt.close(fig)
    return folder


if __name__ == "__main__":
    sys.exit(main())
