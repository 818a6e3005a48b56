"""The file formats and exit codes of a batch job, without the libraries that read and write them:
the service imports this to check a submitted job, and pays for pandas and pyarrow (~150 MB a worker)
only in the job's own process."""

from __future__ import annotations

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
"""Input files by suffix."""
OUTPUT_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
INTERRUPTED = 130
BAD_INPUT = 2
"""``python -m batch`` exit codes besides 0: interrupted (Ctrl-C), and input it refused before scoring."""
