"""Batch jobs inside the service (``POST /score_file/submit``, a BentoML task): an uploaded file scored
by ``python -m batch`` in a process of its own, so the workers keep answering online requests while it
runs, and the result is byte for byte what the command gives for the same file.

At most ``batch.max_jobs`` jobs run at once across the workers: a job takes one of that many slots, a
lock file each (``flock``: the kernel releases it if a worker dies), and a job beyond them waits for
a free slot (its task stays ``in_progress``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from batch import routing
from batch.formats import BAD_INPUT, FORMATS, OUTPUT_FORMATS
from common import config
from common.config import BatchJobs
from common.errors import NotFoundError, RequestError

ROOT = Path(__file__).resolve().parent.parent
"""The project (or the bento's ``src``): where ``python -m batch`` is found."""
JOBS_FOLDER = "batch-jobs"
"""The jobs' work folders and slot locks, under the model store's home (shared by the workers)."""
SLOT_WAIT_S = 1.0
"""Seconds between tries for a free slot while ``max_jobs`` jobs run."""
OUTPUT_MEDIA_TYPE = "application/octet-stream"
ERROR_PREFIX = "error: "
"""How ``python -m batch`` starts the line that says why it refused its input (exit status 2)."""
SHOWN_STDERR_CHARS = 2000
"""The end of the command's stderr kept in an error when it has no such line."""


@dataclass(frozen=True)
class Scored:
    """A finished job: the output file's bytes and name, and the command's summary."""

    content: bytes
    filename: str
    summary: dict[str, Any]

    def headers(self) -> dict[str, str]:
        """The summary's counts beside the file, so a client needs no second request for them."""
        return {"Content-Disposition": f'attachment; filename="{self.filename}"',
                "X-Batch-Rows": str(self.summary["rows"]), "X-Batch-Rejected": str(self.summary["rejected"])}


class Jobs:
    """Runs uploaded files through ``python -m batch``, ``settings.max_jobs`` at a time across workers
    that share ``folder`` (under the model store's home)."""

    def __init__(self, settings: BatchJobs, folder: Path, config_path: Path):
        self.settings = settings
        self.folder = folder
        self.config_path = config_path
        folder.mkdir(parents=True, exist_ok=True)

    async def score(self, upload: Path, model: str, id_column: str | None, variant: str | None,
                    output_format: str) -> Scored:
        """Score ``upload``; a wrong model, variant, format or column is a :class:`RequestError` (the
        command's own checks, before any row is scored)."""
        suffix = upload.suffix.lower()  # uploads are tables; images are scored from a folder by the command
        if suffix not in FORMATS:
            raise RequestError("file", f"cannot tell the format of {upload.name!r} from its name",
                               "a file named *" + ", *".join(FORMATS))
        output_suffix = f".{output_format}"
        if output_suffix not in OUTPUT_FORMATS:
            raise RequestError("output_format", f"{output_format!r} is not an output format",
                               " or ".join(s.lstrip(".") for s in OUTPUT_FORMATS))
        routed = await asyncio.to_thread(routing.in_force, model, config.load(self.config_path))  # reads the store
        experiments = routed.settings.experiments  # a variant added live is known, as the command will know it
        if model not in experiments:
            raise NotFoundError("model", f"{model!r} is not served", ", ".join(experiments))
        if variant is not None and experiments[model].variant(variant) is None:
            raise NotFoundError("variant", f"{model} has no variant {variant!r}",
                                ", ".join(v.name for v in experiments[model].variants))
        work = Path(tempfile.mkdtemp(prefix="job-", dir=self.folder))
        try:
            source = work / f"input{suffix}"
            shutil.copyfile(upload, source)
            output = work / f"scores{output_suffix}"
            summary = work / "summary.json"
            command = [sys.executable, "-m", "batch", model, str(source), str(output), "--config",
                       str(self.config_path), "--workers", "1", "--threads", str(self.settings.threads),
                       "--summary-json", str(summary)]
            command += ["--id-column", id_column] if id_column else []
            command += ["--variant", variant] if variant else []
            async with self._slot():
                returncode, stderr = await _run(command)
            if returncode == BAD_INPUT:
                errors = [line.removeprefix(ERROR_PREFIX) for line in stderr.splitlines() if line.startswith(ERROR_PREFIX)]
                raise RequestError("file", errors[-1] if errors else stderr.strip()[-SHOWN_STDERR_CHARS:],
                                   "a file with exactly the model's columns (docs/batch.md)")
            if returncode != 0:
                raise RuntimeError(f"python -m batch exited with status {returncode}: {stderr[-SHOWN_STDERR_CHARS:]}")
            return Scored(output.read_bytes(), output.name, json.loads(summary.read_text()))
        finally:
            shutil.rmtree(work, ignore_errors=True)

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """One of ``max_jobs`` lock files, waited for without blocking the event loop."""
        while True:
            for index in range(self.settings.max_jobs):
                handle = _locked(self.folder / f"slot-{index}.lock")
                if handle is None:
                    continue
                try:
                    yield
                finally:
                    handle.close()  # closing the file releases its lock
                return
            await asyncio.sleep(SLOT_WAIT_S)


def _locked(path: Path) -> IO[bytes] | None:
    """``path`` opened and locked, or None when another job holds it."""
    handle = open(path, "ab")  # noqa: SIM115 - held open for as long as the job runs
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


async def _run(command: list[str]) -> tuple[int, str]:
    """Run the command to its end (killed if the task is cancelled): its status and its stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    process = await asyncio.create_subprocess_exec(*command, cwd=ROOT, env=env, stdout=asyncio.subprocess.DEVNULL,
                                                   stderr=asyncio.subprocess.PIPE)
    try:
        _, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None, "communicate() waits for the process"
    return process.returncode, stderr.decode(errors="replace")
