"""One chunk of rows to predictions: checked, routed, inferred. The same code on one machine
(``batch/job.py``) and in Spark executors (``batch/spark.py``), so both give the same answer.

A row is rejected, never fatal, when a feature is missing, NaN, infinite or not a number, or when its id
is missing: the first problem in column order is its reason. The variant is the online router's
(``experiments.router.Router.route`` over the experiments in force online, ``batch/routing.py``: the
same salt, weights and epoch), sticky by an id column, or one fixed variant (the id column is then only
kept).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import bentoml
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from common import store
from common.config import Config, Experiment, Variant
from common.schema import Schema
from experiments.router import Router
from runtimes import Runtime, load_runtime

ROW = "row"
"""Output and rejects column: the row's number in its input file, from 1 (a CSV's header is not a row)."""
REASON = "reason"
VARIANT = "variant"
MODEL_TAG = "model_tag"
LABEL = "label"
PROBABILITY_PREFIX = "probability_"
ONNX_RUNTIME = "onnxruntime"
"""The ``runtime`` label of ONNX twins (FP32 and INT8) in the model store."""
PIXEL_PREFIX = "pixel_"
"""Models without feature names (digits, 8x8) take one column per value, row-major: pixel_0..pixel_63."""
INFER_ROWS = 4096
"""Rows per runtime call: the digits torch program is exported for batches of at most 4096 rows
(``MAX_EXPORT_BATCH`` in training/digits.py); larger calls gain nothing measurable."""
SHOWN_VALUE_CHARS = 40
"""A rejected value is quoted in its reason up to this many characters."""


class BatchInputError(ValueError):
    """Input the job cannot start on (a missing or extra column, no file, an unknown model or variant):
    raised before any row is scored, with a message that names what is wrong and what was expected."""


def feature_columns(schema: Schema) -> list[str]:
    """The input columns of a model, in the order the model takes them."""
    if schema.feature_names:
        return list(schema.feature_names)
    return [f"{PIXEL_PREFIX}{i}" for i in range(math.prod(schema.input_shape))]


def default_variant(experiment: Experiment, models: dict[str, bentoml.Model]) -> Variant:
    """ONNX twins by default: the experiment's first variant served by onnxruntime, else its control."""
    onnx = [v for v in experiment.variants if models[v.model].info.labels.get("runtime") == ONNX_RUNTIME]
    return onnx[0] if onnx else experiment.control


@dataclass(frozen=True)
class Scored:
    """A chunk's predictions (``rows`` columns in input order) and its rejects (row, id, reason)."""

    rows: pa.Table
    rejects: pa.Table


class Scorer:
    """Everything needed to score rows of one logical model; runtimes load on first use, once per process."""

    def __init__(self, model: str, config: Config, id_column: str | None = None, variant: str | None = None,
                 threads: int = 1, sticky: bool = True):
        """``sticky`` False: the id column is only kept, never routed by (the file names of images
        scored without ``--id-column``)."""
        if model not in config.experiments:
            raise BatchInputError(f"unknown model {model!r}; expected one of {', '.join(config.experiments)}")
        self.model = model
        self.router = Router(config.experiments)
        self.experiment = config.experiments[model]
        self.epoch = self.router.epoch(model)
        models = {v.model: store.get(v.model) for v in self.experiment.variants}
        schemas = {Schema.from_metadata(m.info.metadata, model) for m in models.values()}
        if len(schemas) != 1:
            raise BatchInputError(f"the variants of {model!r} disagree on input shape or classes")
        self.schema = schemas.pop()
        self.id_column = id_column
        self.by_default = (id_column is None or not sticky) and variant is None
        if self.by_default:
            variant = default_variant(self.experiment, models).name
        if variant is not None and self.experiment.variant(variant) is None:
            raise BatchInputError(f"unknown variant {variant!r} of {model!r}; expected one of "
                                  + ", ".join(v.name for v in self.experiment.variants))
        self.variant = variant
        self.columns = feature_columns(self.schema)
        self.classes = list(self.schema.classes)
        self.threads = threads
        self._models = models
        self._runtimes: dict[str, Runtime] = {}

    @property
    def input_columns(self) -> list[str]:
        return [*([self.id_column] if self.id_column else []), *self.columns]

    @property
    def output_columns(self) -> list[str]:
        return [*self.input_columns[:1 if self.id_column else 0], ROW, VARIANT, MODEL_TAG, LABEL,
                *self.probability_columns]

    @property
    def probability_columns(self) -> list[str]:
        return [f"{PROBABILITY_PREFIX}{c}" for c in self.classes]

    def assignment(self) -> str:
        """How variants are assigned, in words, for the summary."""
        if self.variant is None:
            weights = ", ".join(f"{v.name}={v.weight:g}" for v in self.experiment.variants)
            return (f"sticky by column {self.id_column!r} with the online router (salt "
                    f"{self.experiment.salt!r}, weights {weights}, epoch {self.epoch})")
        chosen = self.experiment.variant(str(self.variant))
        assert chosen is not None
        why = " (the ONNX twin, by default: no --id-column, no --variant)" if self.by_default else ""
        return f"fixed variant {chosen.name} ({chosen.model}){why}"

    def check_columns(self, names: Sequence[str], where: str) -> None:
        """Before any work: the input has exactly the model's columns (and the id column), any order."""
        expected = self.input_columns
        missing = [c for c in expected if c not in names]
        extra = [c for c in names if c not in expected]
        if missing or extra:
            problems = "; ".join(part for part in (
                f"missing columns {missing}" if missing else "", f"unexpected columns {extra}" if extra else "")
                if part)
            raise BatchInputError(f"{where}: {problems}. {self.model} takes exactly the columns {expected}"
                                  " in any order" + ("" if self.id_column else
                                                     " (an id column is kept with --id-column COL)"))

    def runtime(self, tag: str) -> Runtime:
        if tag not in self._runtimes:
            self._runtimes[tag] = load_runtime(self._models[tag], self.threads)
        return self._runtimes[tag]

    def score(self, table: pa.Table, rows: np.ndarray | None, rejected: Sequence[tuple[int, str]] = ()) -> Scored:
        """``table`` holds ``input_columns`` (any order, any types); ``rows`` their row numbers (None in
        Spark, where rows have no number). ``rejected``: rows the reader already refused, kept in the rejects."""
        count = table.num_rows
        features, reasons = self._features(table)
        ids = None
        if self.id_column:
            ids = _strings(table[self.id_column])
            missing_id = np.array([i is None for i in ids], dtype=bool)
            _blame(reasons, missing_id, f"missing id in column {self.id_column!r}")
        good = np.flatnonzero(reasons == None)
        variants = self._variants([ids[i] for i in good] if ids is not None else None, len(good))
        probabilities = np.zeros((len(good), len(self.classes)), dtype=np.float32)
        tags = np.empty(len(good), dtype=object)
        for variant in self.experiment.variants:
            picked = np.flatnonzero(variants == variant.name)
            if len(picked):
                runtime = self.runtime(variant.model)
                for start in range(0, len(picked), INFER_ROWS):
                    part = picked[start:start + INFER_ROWS]
                    probabilities[part] = runtime.infer(features[good[part]].reshape(-1, *self.schema.input_shape))
                tags[picked] = variant.model
        columns: dict[str, pa.Array] = {}
        if ids is not None:
            columns[str(self.id_column)] = pa.array([ids[i] for i in good], pa.string())
        if rows is not None:
            columns[ROW] = pa.array(rows[good], pa.int64())
        columns[VARIANT] = pa.array(variants, pa.string())
        columns[MODEL_TAG] = pa.array(tags, pa.string())
        columns[LABEL] = pa.array(np.asarray(self.classes, dtype=object)[probabilities.argmax(axis=1)], pa.string())
        for index, name in enumerate(self.probability_columns):
            columns[name] = pa.array(probabilities[:, index], pa.float32())
        bad = np.flatnonzero(reasons != None)
        return Scored(pa.table(columns), self._rejects(rows, ids, bad, reasons, rejected, count))

    def _variants(self, ids: list[str] | None, count: int) -> np.ndarray:
        if ids is None or self.variant is not None:
            return np.full(count, self.variant, dtype=object)
        route, model = self.router.route, self.model
        return np.array([route(model, user_id).variant.name for user_id in ids], dtype=object)

    def _features(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """float32 (rows, features) and, per row, why it is rejected (None: it is fine)."""
        reasons = np.full(table.num_rows, None, dtype=object)
        features = np.empty((table.num_rows, len(self.columns)), dtype=np.float32)
        for index, name in enumerate(self.columns):
            column = table[name]
            values, not_number = _numbers(column)
            missing = column.is_null().to_numpy(zero_copy_only=False)
            with np.errstate(over="ignore"):  # beyond float32 becomes infinity, rejected just below
                as_float32 = values.astype(np.float32)
            features[:, index] = as_float32
            _blame(reasons, missing, f"missing value in column {name!r}")
            for row in np.flatnonzero(not_number & (reasons == None)):
                shown = str(column[int(row)].as_py())[:SHOWN_VALUE_CHARS]
                reasons[row] = f"not a number in column {name!r}: {shown!r}"
            _blame(reasons, np.isnan(values) & ~missing & ~not_number, f"NaN in column {name!r}")
            _blame(reasons, np.isinf(as_float32), f"infinite or beyond float32 in column {name!r}")
        return features, reasons

    def _rejects(self, rows: np.ndarray | None, ids: list[str | None] | None, bad: np.ndarray,
                 reasons: np.ndarray, rejected: Sequence[tuple[int, str]], count: int) -> pa.Table:
        entries = [(int(rows[i]) if rows is not None else None, ids[i] if ids is not None else None,
                    str(reasons[i])) for i in bad]
        entries += [(row, None, reason) for row, reason in rejected]
        entries.sort(key=lambda e: -1 if e[0] is None else e[0])
        return pa.table({ROW: pa.array([e[0] for e in entries], pa.int64()),
                         "id": pa.array([e[1] for e in entries], pa.string()),
                         REASON: pa.array([e[2] for e in entries], pa.string())})


def _blame(reasons: np.ndarray, mask: np.ndarray, reason: str) -> None:
    """Give ``reason`` to the rows in ``mask`` that have none yet (a row keeps its first problem)."""
    reasons[mask & (reasons == None)] = reason


def _strings(column: pa.ChunkedArray) -> list[str | None]:
    """Ids as the online router sees them: text (an integer 42 is the user id "42")."""
    try:
        return pc.cast(column, pa.string()).to_pylist()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return [None if v is None else str(v) for v in column.to_pylist()]


def _numbers(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """float64 values (NaN where missing or not a number) and which values are not numbers."""
    kind = column.type
    if pa.types.is_null(kind):
        return np.full(len(column), np.nan), np.zeros(len(column), dtype=bool)
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind) \
            or pa.types.is_boolean(kind):
        return _to_numpy(pc.cast(column, pa.float64())), np.zeros(len(column), dtype=bool)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        try:  # Arrow's parser first: fast, and every value of a clean column parses
            return _to_numpy(pc.cast(column, pa.float64())), np.zeros(len(column), dtype=bool)
        except pa.ArrowInvalid:
            pass
    series = column.to_pandas()
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return values, np.isnan(values) & series.notna().to_numpy()


def _to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    return column.to_numpy().astype(np.float64, copy=False)
