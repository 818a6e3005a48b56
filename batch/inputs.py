"""Input files to fixed-size chunks of rows, streamed: memory holds a chunk or two, never a file.

A file's chunks are the same on every run (``chunk_rows`` rows each, the last one shorter), which is
what lets a resumed job skip the chunks it finished. Every row keeps its number in its file (from 1;
a CSV header is not a row), and rows the reader itself refuses (a CSV line with too few or too many
values, a JSON Lines line that is not an object) are handed on as rejects with their number.

A directory of PNG/JPEG files (digits) is one input of its own: one row per image, in sorted order, its
path in the directory as the id, decoded exactly as ``/classify_image`` decodes an upload
(``common/images.py``); an unreadable file is a reject with the reason the service would give.
"""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from batch.formats import FORMATS
from batch.scoring import PIXEL_PREFIX, BatchInputError
from common import images
from common.config import Limits
from common.errors import RequestError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGES = "images"
"""The format of a directory of image files (one input, one row per image)."""
CSV_BLOCK_BYTES = 1 << 22
"""Bytes Arrow's CSV reader parses at a time (4 MiB: ~50k rows of wine)."""
COUNT_BLOCK_BYTES = 1 << 24
"""Bytes read at a time when counting the lines of a text file for the progress bar's total."""


def discover(spec: str) -> list[Path]:
    """A file, a directory (its files of known formats, recursively) or a glob; sorted, so every run
    reads the same files in the same order. A directory of images (and no tables) is one input."""
    path = Path(spec)
    if path.is_dir() and image_files(path):
        if any(p.suffix.lower() in FORMATS for p in path.rglob("*") if p.is_file()):
            raise BatchInputError(f"input {spec!r} holds both tables and images; score them as separate inputs")
        return [path]
    if path.is_file():
        found = [path]
    elif path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file())
    elif glob.has_magic(spec):
        found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    else:
        raise BatchInputError(f"input {spec!r}: no such file or directory")
    known = [p for p in found if p.suffix.lower() in FORMATS]
    if path.is_file() and not known:
        raise BatchInputError(f"input {spec!r}: unknown format {path.suffix!r}; expected one of "
                              + ", ".join(sorted(FORMATS)))
    if not known:
        raise BatchInputError(f"input {spec!r}: no {', '.join(sorted(FORMATS))} file found")
    return known


def file_format(path: Path) -> str:
    return IMAGES if path.is_dir() else FORMATS[path.suffix.lower()]


def image_files(directory: Path) -> list[Path]:
    """The PNG/JPEG files of a directory, recursively, in sorted order (their row order)."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def columns_of(path: Path) -> list[str]:
    """The column names of a file, read from its header, schema or first JSON object."""
    kind = file_format(path)
    if kind == IMAGES:
        raise BatchInputError(f"{path} is a directory of images: it has no columns")
    if kind == "parquet":
        return list(pq.read_schema(path).names)
    with open(path, newline="", encoding="utf-8") as stream:
        if kind == "csv":
            return next(csv.reader(stream), [])
        for line in stream:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError as err:
                    raise BatchInputError(f"{path}: the first line is not JSON: {err}") from None
                if not isinstance(first, dict):
                    raise BatchInputError(f"{path}: the first line is not a JSON object")
                return list(first)
    return []


def count_rows(path: Path) -> int:
    """Rows in a file, for the progress bar: Parquet's metadata, or the lines of a text file."""
    kind = file_format(path)
    if kind == IMAGES:
        return len(image_files(path))
    if kind == "parquet":
        return pq.ParquetFile(path).metadata.num_rows
    lines, last = 0, b"\n"
    with open(path, "rb") as stream:
        while block := stream.read(COUNT_BLOCK_BYTES):
            lines += block.count(b"\n")
            last = block[-1:]
    lines += last != b"\n"
    return lines - (kind == "csv")


@dataclass
class Chunk:
    file: int
    index: int
    table: pa.Table
    rows: np.ndarray
    rejected: list[tuple[int, str]]


@dataclass
class _Refused:
    """Rows a reader refused, by row number, in file order, until the chunk that holds them takes them."""

    pending: list[tuple[int, str]] = field(default_factory=list)

    def numbers(self, start: int, count: int) -> np.ndarray:
        """The numbers of the next ``count`` rows read from row ``start`` on, skipping refused rows."""
        refused = np.array([row for row, _ in self.pending if row >= start], dtype=np.int64)
        candidates = np.arange(start, start + count + len(refused), dtype=np.int64)
        return candidates[~np.isin(candidates, refused)][:count]

    def take(self, last: int | None) -> list[tuple[int, str]]:
        """The refused rows up to row ``last`` (all of them when None)."""
        taken = [entry for entry in self.pending if last is None or entry[0] <= last]
        self.pending = self.pending[len(taken):]
        return taken


@dataclass(frozen=True)
class ImageInput:
    """How a directory of images becomes rows: the model's image shape and the service's size limits."""

    shape: tuple[int, ...]
    limits: Limits


def chunks(path: Path, file: int, columns: list[str], chunk_rows: int,
           image_input: ImageInput | None = None) -> Iterator[Chunk]:
    """The file's chunks in order; each table holds ``columns`` (checked beforehand), any types.
    A directory of images needs ``image_input``; its ``columns`` are the id column and the pixels."""
    refused = _Refused()
    kind = file_format(path)
    if kind == IMAGES:
        if image_input is None:
            raise BatchInputError(f"{path}: a directory of images needs a model that takes images")
        source = _images(path, columns, chunk_rows, refused, image_input)
    else:
        source = {"csv": _csv, "parquet": _parquet, "jsonl": _jsonl}[kind](path, columns, chunk_rows, refused)
    tables, numbers, held = [], [], 0
    index = 0
    for table, rows in source:
        tables.append(table)
        numbers.append(rows)
        held += table.num_rows
        while held >= chunk_rows:
            whole = pa.concat_tables(tables)
            all_rows = np.concatenate(numbers)
            head, head_rows = whole.slice(0, chunk_rows), all_rows[:chunk_rows]
            yield Chunk(file, index, head, head_rows, refused.take(int(head_rows[-1])))
            index += 1
            tables, numbers = [whole.slice(chunk_rows)], [all_rows[chunk_rows:]]
            held -= chunk_rows
    if held or refused.pending:
        rest = pa.concat_tables(tables) if tables else _empty(columns)
        yield Chunk(file, index, rest, np.concatenate(numbers) if numbers else np.empty(0, np.int64),
                    refused.take(None))


def _empty(columns: list[str]) -> pa.Table:
    return pa.table({c: pa.array([], pa.string()) for c in columns})


def _csv(path: Path, columns: list[str], chunk_rows: int, refused: _Refused) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """Every value read as text and converted by the scorer, so one bad value rejects its row only; only
    an empty field is missing ("NaN" is NaN). Empty lines are rows too (rejected: their values are
    missing), so row numbers are line numbers minus the header."""

    def refuse(row: Any) -> str:
        if row.number is None:
            return "error"  # Arrow cannot number the row: stop rather than misnumber every row after it
        few = row.actual_columns < row.expected_columns
        refused.pending.append((row.number - 1, f"too {'few' if few else 'many'} values: "
                                                f"{row.actual_columns} of {row.expected_columns}"))
        return "skip"

    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(use_threads=False, block_size=CSV_BLOCK_BYTES),
        parse_options=pacsv.ParseOptions(invalid_row_handler=refuse, ignore_empty_lines=False),
        convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in columns},
                                             strings_can_be_null=True, null_values=[""],
                                             include_columns=columns))
    start = 1
    for batch in reader:
        rows = refused.numbers(start, batch.num_rows)
        if len(rows):
            start = int(rows[-1]) + 1
        yield pa.Table.from_batches([batch]), rows


def _parquet(path: Path, columns: list[str], chunk_rows: int, refused: _Refused) -> Iterator[tuple[pa.Table, np.ndarray]]:
    start = 1
    for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows, columns=columns):
        yield pa.Table.from_batches([batch]), np.arange(start, start + batch.num_rows, dtype=np.int64)
        start += batch.num_rows


def _jsonl(path: Path, columns: list[str], chunk_rows: int, refused: _Refused) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """One JSON object a line; a line that is not one, or has keys beside the columns, is refused."""
    records: list[dict[str, Any]] = []
    numbers: list[int] = []
    wanted = set(columns)
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                refused.pending.append((number, f"not JSON: {err.msg}"))
                continue
            if not isinstance(record, dict):
                refused.pending.append((number, f"not a JSON object: {type(record).__name__}"))
                continue
            extra = sorted(set(record) - wanted)
            if extra:
                refused.pending.append((number, f"unexpected keys {extra}"))
                continue
            records.append(record)
            numbers.append(number)
            if len(records) == chunk_rows:
                yield _records_table(records, columns), np.array(numbers, dtype=np.int64)
                records, numbers = [], []
    if records:
        yield _records_table(records, columns), np.array(numbers, dtype=np.int64)


def _records_table(records: list[dict[str, Any]], columns: list[str]) -> pa.Table:
    """Each column typed by Arrow when its values agree, else as text for the scorer to judge."""
    arrays = {}
    for name in columns:
        values = [r.get(name) for r in records]
        try:
            arrays[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
            arrays[name] = pa.array([None if v is None else json.dumps(v) if not isinstance(v, str) else v
                                     for v in values], pa.string())
    return pa.table(arrays)


def _images(directory: Path, columns: list[str], chunk_rows: int, refused: _Refused,
            image_input: ImageInput) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """One row per image: the id column (the path in the directory) and the pixels, decoded like an
    upload to ``/classify_image``; a file that does not decode is refused with the service's reason."""
    [id_column] = [c for c in columns if not c.startswith(PIXEL_PREFIX)]
    pixel_columns = [c for c in columns if c.startswith(PIXEL_PREFIX)]
    names: list[str] = []
    rows: list[np.ndarray] = []
    numbers: list[int] = []
    limits = image_input.limits
    for number, path in enumerate(image_files(directory), start=1):
        name = str(path.relative_to(directory))
        try:
            image = images.decode(path.read_bytes(), name, limits.max_image_bytes, limits.max_image_pixels)
            pixels = images.to_pixels(image, image_input.shape)
        except RequestError as err:
            refused.pending.append((number, str(err)))
            continue
        names.append(name)
        rows.append(pixels.reshape(-1))
        numbers.append(number)
        if len(names) == chunk_rows:
            yield _pixels_table(id_column, names, rows, pixel_columns), np.array(numbers, dtype=np.int64)
            names, rows, numbers = [], [], []
    if names:
        yield _pixels_table(id_column, names, rows, pixel_columns), np.array(numbers, dtype=np.int64)


def _pixels_table(id_column: str, names: list[str], rows: list[np.ndarray], pixel_columns: list[str]) -> pa.Table:
    pixels = np.stack(rows).astype(np.float32, copy=False)
    return pa.table({id_column: pa.array(names, pa.string()),
                     **{name: pa.array(pixels[:, i]) for i, name in enumerate(pixel_columns)}})
