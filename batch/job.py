"""The one-machine job: chunks scored in parallel, each written as a part file and recorded in a
manifest, then assembled in order into the output.

Resumable: the work folder ``OUTPUT.parts/`` holds one Parquet part per finished chunk and
``manifest.jsonl``, a line per finished chunk written after its part is complete (renamed into place).
After a crash or Ctrl-C the same command skips the chunks the manifest lists and scores the rest;
the output is assembled from the parts in (file, chunk) order only once all are done, so it is the
same bytes as an uninterrupted run's. The manifest's first line records the job (model, inputs with
their sizes and modification times, assignment, chunk size, runtime threads): a different job refuses
to resume it.

Routing: the experiment in force online (``batch/routing.py``: the experiment store's row, else
config.yaml's), read once at the start; its weights are in the manifest's assignment, so a job whose
weights changed between a crash and the resume refuses to mix them.

Parallel: by default one process whose runtimes use every core as threads; ``workers`` processes, each
loading the models once, are the other way (docs/batch.md compares them: threads won here). The output
depends on neither the worker count nor a resume, only on the input, the job and the thread count.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from batch import inputs, routing
from batch.formats import OUTPUT_FORMATS
from batch.scoring import BatchInputError, Scorer
from common import config
from common.config import Config
from common.logs import get_logger

CHUNK_ROWS = 65_536
"""Rows scored at a time: ~3.4 MB of wine features as float32, and enough rows that a runtime call's
overhead is noise (docs/batch.md)."""
IN_FLIGHT_PER_WORKER = 2
"""Chunks read ahead per worker: one scoring, one waiting, so a worker never waits for the reader."""
PROGRESS_EVERY_S = 10.0
"""Seconds between plain progress lines when the output is not a terminal."""
MANIFEST = "manifest.jsonl"
IMAGE_ID_COLUMN = "file"
"""The id column of a directory of images scored without ``--id-column``: each image's path in it."""
log = get_logger("batch")


@dataclass
class Summary:
    """What a job did; ``rows_per_s`` counts the rows scored by this run (a resumed run's own rate)."""

    model: str
    output: str
    rejects: str
    assignment: str
    experiments: str
    """Where the experiment routed with came from: the experiment store, or config.yaml and why."""
    rows: int = 0
    rejected: int = 0
    variants: dict[str, int] = field(default_factory=dict)
    chunks: int = 0
    resumed_chunks: int = 0
    seconds: float = 0.0
    rows_per_s: float = 0.0
    workers: int = 1

    def text(self) -> str:
        shares = ", ".join(f"{name} {count:,}" for name, count in sorted(self.variants.items())) or "none"
        return (f"{self.model}: {self.rows:,} rows scored, {self.rejected:,} rejected, {self.rows_per_s:,.0f} rows/s "
                f"({self.workers} worker(s), {self.chunks} chunks, {self.resumed_chunks} resumed)\n"
                f"  variants: {shares}\n  assignment: {self.assignment}\n  experiments: {self.experiments}\n"
                f"  output: {self.output}\n  rejects: {self.rejects}")


@dataclass(frozen=True)
class Job:
    model: str
    input: str
    output: Path
    id_column: str | None = None
    variant: str | None = None
    workers: int = 1
    """Processes scoring chunks; 1: in this process; 0: one per core."""
    chunk_rows: int = CHUNK_ROWS
    config_path: Path | None = None
    threads: int = 0
    """Runtime threads per worker; 0: one per core with one worker, else 1. The thread count changes the
    order ONNX Runtime sums trees and layers in, so the last bits of a probability depend on it: the
    output is byte for byte the same for the same thread count (a resume on the same machine)."""

    def thread_count(self) -> int:
        if self.threads:
            return self.threads
        return (os.cpu_count() or 1) if self.worker_count() == 1 else 1

    @property
    def parts(self) -> Path:
        return self.output.with_name(self.output.name + ".parts")

    @property
    def rejects(self) -> Path:
        return self.output.with_name(self.output.name.removesuffix(self.output.suffix) + ".rejects.csv")

    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1


def run(job: Job, progress: bool | None = None) -> Summary:
    """Score ``job.input`` into ``job.output``, resuming a previous run of the same job; the input's
    columns are checked first, so a wrong file fails before any row is scored."""
    if job.output.suffix.lower() not in OUTPUT_FORMATS:
        raise BatchInputError(f"output {job.output}: unknown format {job.output.suffix!r}; expected one of "
                              + ", ".join(OUTPUT_FORMATS))
    routed = routing.in_force(job.model, config.load(job.config_path))
    settings = routed.settings
    workers = job.worker_count()
    files = inputs.discover(job.input)
    scorer = _scorer(job, settings, files)
    return _run(job, scorer, settings, files, workers, routed.source, progress)


def _run(job: Job, scorer: Scorer, settings: Config, files: list[Path], workers: int, experiments: str,
         progress: bool | None) -> Summary:
    for path in files:
        if inputs.file_format(path) != inputs.IMAGES:
            scorer.check_columns(inputs.columns_of(path), str(path))
    header = {"model": job.model, "epoch": scorer.epoch, "assignment": scorer.assignment(),
              "chunk_rows": job.chunk_rows, "threads": job.thread_count(), "inputs": [_identity(p) for p in files]}
    done = _open_manifest(job.parts, header)
    summary = Summary(job.model, str(job.output), str(job.rejects), scorer.assignment(), experiments,
                      workers=workers, resumed_chunks=len(done))
    total = sum(inputs.count_rows(p) for p in files)
    started = time.perf_counter()
    scored_now = 0
    with _Progress(total, progress) as bar, open(job.parts / MANIFEST, "a") as manifest:
        bar.resume(sum(entry["rows"] + entry["rejected"] for entry in done.values()))
        for entry in _score_all(job, scorer, settings, files, done, workers, _image_input(scorer, settings)):
            manifest.write(json.dumps(entry) + "\n")
            manifest.flush()
            os.fsync(manifest.fileno())
            done[(entry["file"], entry["chunk"])] = entry
            scored_now += entry["rows"] + entry["rejected"]
            bar.update(entry["rows"] + entry["rejected"])
    _assemble(job, scorer, sorted(done))
    summary.seconds = time.perf_counter() - started
    summary.rows_per_s = scored_now / summary.seconds if summary.seconds else 0.0
    summary.chunks = len(done)
    summary.rows = sum(e["rows"] for e in done.values())
    summary.rejected = sum(e["rejected"] for e in done.values())
    summary.variants = dict(sum((Counter(e["variants"]) for e in done.values()), Counter()))
    shutil.rmtree(job.parts)
    return summary


def _scorer(job: Job, settings: config.Config, files: list[Path]) -> Scorer:
    """The job's scorer; for a directory of images the id column (``IMAGE_ID_COLUMN`` unless
    ``--id-column`` names it) holds each file's path, and routes by it only when named."""
    if inputs.file_format(files[0]) != inputs.IMAGES:
        return Scorer(job.model, settings, job.id_column, job.variant, threads=job.thread_count())
    scorer = Scorer(job.model, settings, job.id_column or IMAGE_ID_COLUMN, job.variant,
                    threads=job.thread_count(), sticky=job.id_column is not None)
    if len(scorer.schema.input_shape) < 2:
        raise BatchInputError(f"{job.model} takes feature vectors, not images; a directory of images is "
                              "scored by a model of images (digits)")
    return scorer


def _image_input(scorer: Scorer, settings: config.Config) -> inputs.ImageInput | None:
    shape = tuple(scorer.schema.input_shape)
    return inputs.ImageInput(shape, settings.limits) if len(shape) >= 2 else None


def _identity(path: Path) -> dict[str, Any]:
    """What the manifest remembers of an input, to refuse resuming over a changed one."""
    if path.is_dir():
        stats = [p.stat() for p in inputs.image_files(path)]
        return {"path": str(path.resolve()), "files": len(stats), "bytes": sum(s.st_size for s in stats),
                "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _open_manifest(parts: Path, header: dict[str, Any]) -> dict[tuple[int, int], dict[str, Any]]:
    """The finished chunks of an earlier run of this job (none for a new one)."""
    manifest = parts / MANIFEST
    if not manifest.exists():
        parts.mkdir(parents=True, exist_ok=True)
        with open(manifest, "w") as stream:
            stream.write(json.dumps(header) + "\n")
        return {}
    lines = manifest.read_text().splitlines()
    if not lines or json.loads(lines[0]) != header:
        raise BatchInputError(f"{parts} holds the unfinished run of another job (other model, input, assignment, "
                              f"chunk size or runtime threads); finish it with its own command, or delete {parts} "
                              "to start over")
    done = {}
    for line in lines[1:]:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # the line being written when the job was killed: its chunk is redone
            continue
        done[(entry["file"], entry["chunk"])] = entry
    with open(manifest, "w") as stream:  # drop a torn last line, so appends start on a line of their own
        stream.write("".join(line + "\n" for line in lines[:1]) + "".join(json.dumps(e) + "\n" for e in done.values()))
    return done


def _score_all(job: Job, scorer: Scorer, settings: Config, files: list[Path], done: dict, workers: int,
               image_input: inputs.ImageInput | None) -> Iterator[dict[str, Any]]:
    """Manifest entries of the chunks scored now, as they finish (in any order)."""
    todo = (chunk for file, path in enumerate(files)
            for chunk in inputs.chunks(path, file, scorer.input_columns, job.chunk_rows, image_input)
            if (chunk.file, chunk.index) not in done)
    if workers == 1:
        for chunk in todo:
            yield _score_chunk(scorer, chunk, job.parts)
        return
    context = multiprocessing.get_context("spawn")  # no fork: the parent holds Arrow's and the runtimes' threads
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                             initargs=(job.model, settings.model_dump(), scorer.id_column, scorer.variant,
                                       job.thread_count())) as pool:
        pending: set[Future] = set()
        try:
            for chunk in todo:
                pending.add(pool.submit(_worker_score, chunk, job.parts))
                if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    yield from (f.result() for f in finished)
            for future in list(pending):
                pending.discard(future)
                yield future.result()
        finally:
            for future in pending:
                future.cancel()


_WORKER: Scorer | None = None


def _start_worker(model: str, settings: dict[str, Any], id_column: str | None, variant: str | None,
                  threads: int) -> None:
    """A pool worker's scorer, with the parent's experiments in force (read from the store once)."""
    global _WORKER
    _WORKER = Scorer(model, Config.model_validate(settings), id_column, variant, threads=threads)


def _worker_score(chunk: inputs.Chunk, parts: Path) -> dict[str, Any]:
    assert _WORKER is not None, "the pool's initializer builds the scorer"
    return _score_chunk(_WORKER, chunk, parts)


def _part(parts: Path, file: int, chunk: int, kind: str) -> Path:
    return parts / f"{kind}-{file:05d}-{chunk:07d}.parquet"


def _score_chunk(scorer: Scorer, chunk: inputs.Chunk, parts: Path) -> dict[str, Any]:
    """Score one chunk and write its parts (temporary name, then renamed: a part is whole or absent)."""
    scored = scorer.score(chunk.table, chunk.rows, chunk.rejected)
    for kind, table in (("rows", scored.rows), ("rejects", scored.rejects)):
        final = _part(parts, chunk.file, chunk.index, kind)
        temporary = final.with_suffix(".tmp")
        pq.write_table(table, temporary)
        os.replace(temporary, final)
    variants = Counter(scored.rows["variant"].to_pylist())
    return {"file": chunk.file, "chunk": chunk.index, "rows": scored.rows.num_rows,
            "rejected": scored.rejects.num_rows, "variants": dict(variants)}


def _assemble(job: Job, scorer: Scorer, chunks: list[tuple[int, int]]) -> None:
    """The parts in (file, chunk) order into the output and the rejects file, each written under a
    temporary name and renamed: the same parts always give the same bytes."""
    names = [str(p["path"]) for p in json.loads((job.parts / MANIFEST).read_text().splitlines()[0])["inputs"]]
    kind = OUTPUT_FORMATS[job.output.suffix.lower()]
    output_tmp = job.output.with_name(job.output.name + ".tmp")
    rejects_tmp = job.rejects.with_name(job.rejects.name + ".tmp")
    rows_schema = _rows_schema(scorer)
    rejects_schema = pa.schema([("file", pa.string()), ("row", pa.int64()), ("id", pa.string()), ("reason", pa.string())])
    rows_writer = pq.ParquetWriter(output_tmp, rows_schema) if kind == "parquet" else pacsv.CSVWriter(output_tmp, rows_schema)
    with rows_writer, pacsv.CSVWriter(rejects_tmp, rejects_schema) as rejects_writer:
        for file, chunk in chunks:
            rows = pq.read_table(_part(job.parts, file, chunk, "rows"))
            if rows.num_rows:
                rows_writer.write_table(rows.cast(rows_schema))
            rejects = pq.read_table(_part(job.parts, file, chunk, "rejects"))
            if rejects.num_rows:
                source = pa.array([names[file]] * rejects.num_rows, pa.string())
                rejects_writer.write_table(pa.table([source, *rejects.columns], schema=rejects_schema))
    os.replace(output_tmp, job.output)
    os.replace(rejects_tmp, job.rejects)


def _rows_schema(scorer: Scorer) -> pa.Schema:
    types = {"row": pa.int64(), **{c: pa.float32() for c in scorer.probability_columns}}
    return pa.schema([(c, types.get(c, pa.string())) for c in scorer.output_columns])


class _Progress:
    """tqdm (rows/s, ETA) on a terminal; otherwise a plain log line every ``PROGRESS_EVERY_S``."""

    def __init__(self, total: int, terminal: bool | None):
        self.total = total
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = tqdm(total=total, unit="rows", unit_scale=True, smoothing=0.1) if self.terminal else None
        self.done = 0
        self.started = self.last = time.monotonic()
        self.first = 0

    def __enter__(self) -> _Progress:
        return self

    def resume(self, rows: int) -> None:
        """Rows an earlier run scored: shown as done, left out of this run's rate."""
        self.first = rows
        self.update(rows)

    def update(self, rows: int) -> None:
        self.done += rows
        if self.bar is not None:
            self.bar.update(rows)
            return
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            rate = (self.done - self.first) / (now - self.started)
            left = (self.total - self.done) / rate if rate else float("inf")
            print(f"batch: {self.done:,} of ~{self.total:,} rows ({100 * self.done / max(self.total, 1):.0f}%), "
                  f"{rate:,.0f} rows/s, ETA {left:,.0f} s", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

