"""Replay a labelled data set against a running server as user traffic, post the true labels as
feedback after a delay, and print the experiment's decision as it evolves, until it settles.

    python -m experiments.replay digits --url http://127.0.0.1:3000 --feedback-token "$BUNDLE_FEEDBACK_TOKEN"

The rows are the family's whole data set, shuffled (seeded) and replayed round after round, each sent
as a sticky user of a fixed pool. Labels go back ``--delay`` seconds after their answer, as an
application would post them once the truth is known. The decision is read from
``GET /experiments/{model}/decision`` every ``--every`` seconds; the replay stops once no candidate is
``continue`` any more, or after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import deque
from typing import Any

import httpx
import numpy as np

from common import datasets

FEEDBACK_TOKEN_ENV = "BUNDLE_FEEDBACK_TOKEN"
SEED = 0


def _rows(family: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    data = datasets.load(family)
    x = np.concatenate([data.x_train, data.x_test])
    y = np.concatenate([data.y_train, data.y_test])
    order = np.random.default_rng(SEED).permutation(len(x))
    return x[order], y[order], data.classes


def _line(decision: dict[str, Any], elapsed: float, sent: int, labelled: int) -> str:
    parts = [f"{elapsed:6.0f}s sent {sent:>7} labelled {labelled:>7}"]
    for c in decision["candidates"]:
        interval = c.get("interval") or [None, None]
        low, high = (f"{v:+.4f}" if v is not None else "   n/a" for v in interval)
        parts.append(f"{c['variant']}: {c['verdict']} diff {c.get('difference') or 0:+.4f} [{low}, {high}]")
    return " | ".join(parts)


async def replay(model: str, url: str, token: str, users: int, batch: int, concurrency: int, delay: float,
                 every: float, max_seconds: float) -> dict[str, Any]:
    """Send, label and watch until every candidate has a verdict; return the last decision."""
    x, y, classes = _rows(model)
    pending: deque[tuple[float, str, str]] = deque()  # (due time, prediction id, true label)
    counts = {"sent": 0, "labelled": 0}
    started = time.monotonic()
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def send(worker: int) -> None:
            position = worker * batch
            who = np.random.default_rng([SEED, worker])
            while time.monotonic() - started < max_seconds:
                index = [(position + k) % len(x) for k in range(batch)]
                # Users drawn at random, not from the row: a user who always sent the same row would
                # make all of that user's outcomes one outcome (a design effect no real traffic has).
                instances = [{"model": model, "inputs": x[i].tolist(), "user_id": f"user-{u}"}
                             for i, u in zip(index, who.integers(users, size=batch))]
                position += batch * concurrency
                response = await client.post("/predict", json={"instances": instances})
                if response.status_code != 200:
                    await asyncio.sleep(0.1)  # shed by the server: back off, then resend
                    continue
                due = time.monotonic() + delay
                for i, answer in zip(index, response.json()):
                    pending.append((due, answer["prediction_id"], classes[y[i]]))
                counts["sent"] += batch

        async def label() -> None:
            while True:
                await asyncio.sleep(min(delay, 1.0))
                items = []
                while pending and pending[0][0] <= time.monotonic():
                    _, prediction_id, truth = pending.popleft()
                    items.append({"prediction_id": prediction_id, "label": truth})
                if items:
                    response = await client.post("/feedback", json={"feedback": items}, headers=headers)
                    response.raise_for_status()
                    counts["labelled"] += response.json()["counts"].get("matched", 0)

        senders = [asyncio.create_task(send(w)) for w in range(concurrency)]
        labeller = asyncio.create_task(label())
        decision: dict[str, Any] = {}
        try:
            while time.monotonic() - started < max_seconds:
                await asyncio.sleep(every)
                response = await client.get(f"/experiments/{model}/decision")
                response.raise_for_status()
                decision = response.json()
                print(_line(decision, time.monotonic() - started, counts["sent"], counts["labelled"]), flush=True)
                if all(c["verdict"] != "continue" for c in decision["candidates"]):
                    break
        finally:
            for task in (*senders, labeller):
                task.cancel()
    return decision


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="digits", choices=datasets.FAMILIES)
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--feedback-token", default=os.environ.get(FEEDBACK_TOKEN_ENV),
                        help=f"the server's {FEEDBACK_TOKEN_ENV} (default: this environment's)")
    parser.add_argument("--users", type=int, default=2000, help="sticky users the rows are spread over")
    parser.add_argument("--batch", type=int, default=32, help="instances per /predict call")
    parser.add_argument("--concurrency", type=int, default=4, help="calls in flight")
    parser.add_argument("--delay", type=float, default=2.0, help="seconds from an answer to its label")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between decision reads")
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args(argv)
    if not args.feedback_token:
        parser.error(f"--feedback-token or {FEEDBACK_TOKEN_ENV} is needed to post labels")
    decision = asyncio.run(replay(args.model, args.url, args.feedback_token, args.users, args.batch,
                                  args.concurrency, args.delay, args.every, args.max_seconds))
    for candidate in decision.get("candidates", []):
        print(f"{candidate['variant']}: {candidate['verdict']}: {candidate['reason']}")
    settled = bool(decision) and all(c["verdict"] != "continue" for c in decision["candidates"])
    return 0 if settled else 1


if __name__ == "__main__":
    sys.exit(main())
