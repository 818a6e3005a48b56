"""Issue 19.5: the token buckets that every worker of a server shares (``common/ratelimit.py``), on real
files and real processes."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
from pyrate_limiter import Duration, Rate

from common.ratelimit import SLOT, WAYS, SharedBuckets

SLOTS = 4096
HOUR = Rate(5, Duration.HOUR)
"""Five at once, then one every 12 minutes: nothing refills while a test runs."""
REFILL_DEADLINE_S = 10


@pytest.fixture
def table(tmp_path: Path) -> SharedBuckets:
    return SharedBuckets(tmp_path / "buckets", SLOTS)


def test_a_full_bucket_admits_its_burst_then_says_when_the_next_token_comes(table: SharedBuckets) -> None:
    assert [table.take("team-a", HOUR) for _ in range(5)] == [0] * 5
    wait_ms = table.take("team-a", HOUR)
    emission_ms = HOUR.interval // HOUR.limit
    assert emission_ms - 60_000 < wait_ms <= emission_ms  # a refused request spends nothing either
    assert table.take("team-a", HOUR) > 0


def test_keys_have_buckets_of_their_own(table: SharedBuckets) -> None:
    for _ in range(5):
        table.take("team-a", HOUR)
    assert table.take("team-a", HOUR) > 0
    assert table.take("team-b", HOUR) == 0


def test_a_spent_bucket_refills_at_its_rate(table: SharedBuckets) -> None:
    fast = Rate(1, 50)  # one token every 50 ms
    assert table.take("team-a", fast) == 0
    assert table.take("team-a", fast) > 0
    deadline = time.monotonic() + REFILL_DEADLINE_S
    while table.take("team-a", fast) > 0:
        assert time.monotonic() < deadline, "no token came back"
        time.sleep(0.01)


def _take_many(path: Path, times: int) -> int:
    buckets = SharedBuckets(path, SLOTS)
    admitted = sum(buckets.take("shared", HOUR) == 0 for _ in range(times))
    buckets.close()
    return admitted


def test_processes_that_open_the_same_file_share_each_bucket(tmp_path: Path) -> None:
    """As BentoML's workers do: spawned processes, each opening the table itself."""
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        admitted = pool.starmap(_take_many, [(tmp_path / "buckets", 50)] * 4)
    assert sum(admitted) == HOUR.limit


def test_the_first_process_sizes_the_table(tmp_path: Path) -> None:
    first = SharedBuckets(tmp_path / "buckets", 64)
    later = SharedBuckets(tmp_path / "buckets", SLOTS)
    assert later.sets == first.sets == 64 // WAYS


def test_more_keys_than_a_set_holds_fail_open_forgetting_the_least_owed(tmp_path: Path) -> None:
    one_set = SharedBuckets(tmp_path / "buckets", WAYS)
    once = Rate(1, Duration.HOUR)
    keys = [f"key-{i}" for i in range(WAYS + 1)]
    for key in keys:  # the last one pushes key-0 out: its arrival time is the earliest, it owes least
        assert one_set.take(key, once) == 0
        time.sleep(0.002)  # distinct arrival times (milliseconds), so "least owed" names one key
    assert one_set.take(keys[0], once) == 0  # forgotten: a full bucket again (never a refusal)
    assert one_set.take(keys[-1], once) > 0  # remembered


def test_an_arrival_time_beyond_any_debt_reads_as_a_full_bucket(tmp_path: Path) -> None:
    """A table written before a reboot holds times of the old monotonic clock, far in the new one's
    future: they must not lock a key out for the old uptime."""
    table = SharedBuckets(tmp_path / "buckets", SLOTS)
    table.take("team-a", HOUR)
    with open(tmp_path / "buckets", "r+b") as raw:
        data = bytearray(raw.read())
        for offset in range(0, len(data), SLOT.size):
            digest, arrival = SLOT.unpack_from(data, offset)
            if digest:
                SLOT.pack_into(data, offset, digest, arrival + 10**15)  # 30 years ahead
        raw.seek(0)
        raw.write(data)
    assert [table.take("team-a", HOUR) for _ in range(HOUR.limit)] == [0] * HOUR.limit
