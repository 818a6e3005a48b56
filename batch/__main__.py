"""``python -m batch MODEL INPUT OUTPUT [--id-column COL] [--variant NAME]``: score files offline.

Exit status: 0 done, 2 bad input or arguments (nothing scored), 130 interrupted (run the same command
again to continue).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from batch.formats import BAD_INPUT, INTERRUPTED
from batch.job import CHUNK_ROWS, Job, run
from batch.scoring import BatchInputError
from common.config import ConfigError


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(prog="python -m batch", description=__doc__.splitlines()[0])
    cli.add_argument("model", help="a logical model (an experiment): wine, cancer, digits")
    cli.add_argument("input", help="a CSV, Parquet or JSON Lines file, a directory of them, a glob, "
                                         "or a directory of PNG/JPEG images (digits)")
    cli.add_argument("output", type=Path, help="OUTPUT.parquet or OUTPUT.csv; rejects go to OUTPUT.rejects.csv")
    cli.add_argument("--id-column", help="the id column: kept in the output, and the variant is sticky per id "
                                         "with the online router (unless --variant); for images it names the "
                                         "column of the file names (default: file, not routed by)")
    cli.add_argument("--variant", help="score every row with this variant (default without --id-column: the "
                                       "experiment's ONNX twin)")
    cli.add_argument("--workers", type=int, default=1, help="scoring processes (default 1: this process; "
                                                            "0: one per core)")
    cli.add_argument("--threads", type=int, default=0, help="runtime threads per worker (default: every core "
                                                            "with one worker, else 1); probabilities may differ "
                                                            "in their last bits between thread counts")
    cli.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS, help="rows per chunk (a resumed job keeps its own)")
    cli.add_argument("--config", type=Path, help="the service's config.yaml (default: $BUNDLE_CONFIG or the "
                                                 "project's): its experiment store (store.url, $BUNDLE_STORE_URL) "
                                                 "gives the experiment in force, its declaration when the store "
                                                 "has none")
    cli.add_argument("--summary-json", type=Path, help="also write the summary here as JSON")
    return cli


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.workers < 0 or args.threads < 0 or args.chunk_rows < 1:
        print("error: --workers and --threads must be >= 0, --chunk-rows >= 1", file=sys.stderr)
        return BAD_INPUT
    job = Job(args.model, args.input, args.output, args.id_column, args.variant, args.workers, args.chunk_rows,
              args.config, args.threads)
    try:
        summary = run(job)
    except (BatchInputError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return BAD_INPUT
    except KeyboardInterrupt:
        print(f"interrupted: finished chunks are kept in {job.parts}; run the same command again to continue",
              file=sys.stderr)
        return INTERRUPTED
    print(summary.text())
    if args.summary_json:
        args.summary_json.write_text(json.dumps(asdict(summary), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
