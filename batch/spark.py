"""The batch job on Apache Spark: ``python -m batch.spark MODEL INPUT OUTPUT [--id-column COL] [--variant NAME]``.

The same scoring as one machine (``batch/scoring.py``: checks, the online router, the runtimes), run by
``mapInArrow`` on Arrow batches. Each executor's Python worker builds its scorer once and loads each
model once, from the model store (``BENTOML_HOME`` on every node) or, with ``--ship-models``, from
``.bentomodel`` exports the driver makes and Spark copies to every executor. Predictions are written as
Parquet partitioned by variant (``OUTPUT/variant=NAME/``), rejects (id, reason) as Parquet in
``OUTPUT.rejects/``. Runs with ``local[*]`` as it is, and unchanged under ``spark-submit`` (docs/batch.md).

Differences from one machine: Spark rows have no row number (rejects name the id, when there is one),
and Spark's CSV reader reads a line with too few values as missing values.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from batch import inputs, routing
from batch.job import CHUNK_ROWS
from batch.scoring import LABEL, MODEL_TAG, REASON, VARIANT, BatchInputError, Scorer
from common import config, store
from common.config import Config

_SCORERS: dict[tuple[Any, ...], Scorer] = {}
"""One scorer (and its loaded models) per executor Python worker and job: Spark reuses its workers."""
READERS = {"csv": lambda r: r.option("header", True).option("inferSchema", False).csv,
           "parquet": lambda r: r.parquet, "jsonl": lambda r: r.json}


def output_schema(scorer: Scorer) -> str:
    """mapInArrow's result: the predictions and, on rejected rows only, the reason."""
    columns = [*([f"`{scorer.id_column}` string"] if scorer.id_column else []),
               f"{VARIANT} string", f"{MODEL_TAG} string", f"{LABEL} string",
               *(f"`{c}` float" for c in scorer.probability_columns), f"{REASON} string"]
    return ", ".join(columns)


def _scorer(model: str, settings: dict[str, Any], id_column: str | None, variant: str | None,
            shipped: tuple[str, ...]) -> Scorer:
    key = (model, repr(settings), id_column, variant, shipped)
    if key not in _SCORERS:
        if shipped:
            _import_shipped(shipped)
        _SCORERS[key] = Scorer(model, Config.model_validate(settings), id_column, variant, threads=1)
    return _SCORERS[key]


def _import_shipped(names: tuple[str, ...]) -> None:
    """Models exported by the driver, imported into a model store of this executor's own."""
    import bentoml
    from pyspark import SparkFiles

    home = Path(tempfile.mkdtemp(prefix="bentoml-batch-"))
    os.environ["BENTOML_HOME"] = str(home)
    from bentoml._internal.configuration.containers import BentoMLContainer

    BentoMLContainer.bentoml_home.set(str(home))
    for name in names:
        bentoml.models.import_model(SparkFiles.get(name))


def score_batches(model: str, settings: dict[str, Any], id_column: str | None, variant: str | None,
                  shipped: tuple[str, ...] = ()) -> Any:
    """The function mapInArrow runs on each executor: Arrow batches in, predictions (and rejects, with
    their reason) out. Arrow, not pandas: pandas would turn a null into NaN and blur the two reasons."""

    def score(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        scorer = _scorer(model, settings, id_column, variant, shipped)
        for batch in batches:
            scored = scorer.score(pa.Table.from_batches([batch]), None)
            rows = scored.rows.append_column(REASON, pa.nulls(scored.rows.num_rows, pa.string()))
            yield from rows.to_batches()
            count = scored.rejects.num_rows
            if count:
                kept = {REASON: scored.rejects[REASON], **({id_column: scored.rejects["id"]} if id_column else {})}
                yield from pa.table({f.name: kept.get(f.name, pa.nulls(count, f.type)) for f in rows.schema},
                                    schema=rows.schema).to_batches()

    return score


def run(spark: Any, model: str, source: str, output: str, id_column: str | None = None,
        variant: str | None = None, kind: str | None = None, config_path: Path | None = None,
        ship_models: bool = False) -> dict[str, Any]:
    """Score ``source`` into ``output`` (Parquet partitioned by variant); the counts per variant and rejects."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    routed = routing.in_force(model, config.load(config_path))  # read once, on the driver
    settings = routed.settings
    scorer = Scorer(model, settings, id_column, variant)  # checks model and variant on the driver, first
    kind = kind or inputs.file_format(inputs.discover(source)[0])
    if kind not in READERS:
        raise BatchInputError(f"{source}: Spark reads tables ({', '.join(READERS)}); score a directory of images "
                              "with python -m batch")
    frame = READERS[kind](spark.read)(source)
    scorer.check_columns(frame.columns, source)
    shipped: tuple[str, ...] = ()
    if ship_models:
        shipped = _ship(spark, scorer)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(CHUNK_ROWS))
    scored = frame.select(*scorer.input_columns).mapInArrow(
        score_batches(model, settings.model_dump(), id_column, variant, shipped), output_schema(scorer))
    scored = scored.persist(StorageLevel.DISK_ONLY)  # scored once, written twice (predictions, rejects)
    try:
        good = scored.filter(F.col(REASON).isNull()).drop(REASON)
        good.write.mode("overwrite").partitionBy(VARIANT).parquet(output)
        scored.filter(F.col(REASON).isNotNull()).select(*([id_column] if id_column else []), REASON) \
            .write.mode("overwrite").parquet(output.rstrip("/") + ".rejects")
        counts = {r[VARIANT] or "rejected": r["count"] for r in scored.groupBy(VARIANT).count().collect()}
    finally:
        scored.unpersist()
    return {"model": model, "assignment": scorer.assignment(), "experiments": routed.source, "output": output,
            "rejected": counts.pop("rejected", 0), "variants": counts}


def _ship(spark: Any, scorer: Scorer) -> tuple[str, ...]:
    """Export the variants' models and hand them to Spark, which copies them to every executor."""
    import bentoml

    folder = Path(tempfile.mkdtemp(prefix="bentoml-export-"))
    names = []
    for variant in scorer.experiment.variants:
        name = variant.model.replace(":", "-") + ".bentomodel"
        bentoml.models.export_model(str(store.get(variant.model).tag), str(folder / name))
        spark.sparkContext.addFile(str(folder / name))
        names.append(name)
    return tuple(names)


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(prog="python -m batch.spark", description=__doc__.splitlines()[0])
    cli.add_argument("model")
    cli.add_argument("input", help="a file, directory or glob Spark reads (local, HDFS, S3...)")
    cli.add_argument("output", help="a folder: Parquet partitioned by variant; rejects in OUTPUT.rejects")
    cli.add_argument("--id-column")
    cli.add_argument("--variant")
    cli.add_argument("--format", choices=sorted(READERS), help="the input format when INPUT is not a local path")
    cli.add_argument("--master", help="e.g. local[2]; default: spark-submit's, or local[*]")
    cli.add_argument("--config", type=Path)
    cli.add_argument("--ship-models", action="store_true",
                     help="export the models to .bentomodel files and ship them to the executors "
                          "(for a cluster without the model store)")
    args = cli.parse_args(argv)
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # executors run this interpreter (its packages)
    builder = SparkSession.builder.appName(f"batch-{args.model}")
    if args.master:
        builder = builder.master(args.master)
    spark = builder.getOrCreate()
    try:
        result = run(spark, args.model, args.input, args.output, args.id_column, args.variant, args.format,
                     args.config, args.ship_models)
    except BatchInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        spark.stop()
    shares = ", ".join(f"{k} {v:,}" for k, v in sorted(result["variants"].items()))
    print(f"{args.model}: {sum(result['variants'].values()):,} rows scored, {result['rejected']:,} rejected\n"
          f"  variants: {shares}\n  assignment: {result['assignment']}\n  experiments: {result['experiments']}\n"
          f"  output: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
