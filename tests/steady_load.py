"""A steady load from a process of its own: ``python -m tests.steady_load URL RATE SECONDS OUT``.

One single-row ``/predict`` of wine per tick, each from a new user (so the A/B split is exercised),
sent on schedule whatever the answers do. Every answer is written to ``OUT`` as a JSON line: when it
was sent, its status, the row of the test split it carried and, when 2xx, the variant, prediction id
and probabilities, so that a test can check what served and what it answered.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aiohttp

from common import datasets

TIMEOUT_S = 30


async def run(url: str, rate: float, seconds: float, out: str) -> None:
    rows = datasets.load("wine").x_test.tolist()
    records: list[dict] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as session:

        async def one(i: int, sent: float) -> None:
            body = {"instances": [{"model": "wine", "inputs": rows[i % len(rows)], "user_id": f"load-{i}"}]}
            record: dict = {"i": i, "t": sent, "row": i % len(rows)}
            try:
                async with session.post(f"{url}/predict", json=body) as response:
                    record["status"] = response.status
                    answer = await response.json(content_type=None)
                    if response.status == 200:
                        record.update({k: answer[0][k] for k in ("variant", "model_tag", "prediction_id",
                                                                  "probabilities")})
                    else:
                        record["error"] = answer
            except (TimeoutError, aiohttp.ClientError) as err:
                record["status"] = f"socket error: {err!r}"
            records.append(record)

        start = time.monotonic()
        tasks = []
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, time.time())))
        await asyncio.gather(*tasks)
    with open(out, "w") as stream:
        for record in sorted(records, key=lambda r: r["i"]):
            stream.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    url, rate, seconds, out = sys.argv[1:5]
    asyncio.run(run(url, float(rate), float(seconds), out))
