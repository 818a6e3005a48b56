"""Give every stored model its ONNX twins (``report``: summarise the stored twins)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from common import datasets, store, tables
from common.logs import setup_logging
from conversion import report, twins
from conversion.source import is_source

DEFAULT_OUT = Path("docs/conversion")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conversion", description=__doc__)
    parser.add_argument("command", nargs="?", choices=("convert", "report"), default="convert")
    parser.add_argument("--family", action="append", choices=datasets.FAMILIES,
                        help="only this family (repeatable); default: all")
    parser.add_argument("--reconvert", action="store_true", help="replace twins already stored")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"report: folder for report.md and report.png (default {DEFAULT_OUT})")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.command == "report":
        print(report.write(args.out, args.family))
        return 0
    return convert(args.family, args.reconvert)


def convert(families: list[str] | None, reconvert: bool) -> int:
    sources = [m for m in store.list_models() if is_source(m)
               and (not families or m.info.labels["family"] in families)]
    jobs = [m for m in sources if reconvert or twins.pending(m)]
    if not jobs:
        print("every model already has its ONNX twins in", store.bentoml_home(),
              "(use --reconvert to replace them)")
        return 0
    outcomes = []
    for model in tqdm(jobs, desc="converting", unit="model"):
        outcomes += twins.convert(model, replace=reconvert)
    rows = [[o.source, o.twin or "-", o.precision, o.status,
             *(report.metric_cells(o.metadata) if o.metadata else [""] * len(report.METRIC_HEADERS))]
            for o in outcomes]
    print(tables.markdown(["source", "twin", "precision", "result", *report.METRIC_HEADERS], rows))
    failed = [o for o in outcomes if o.failures]
    for outcome in failed:
        for failure in outcome.failures:
            print(f"{outcome.twin}: {failure}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} twin(s) failed their gates and were not stored", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
