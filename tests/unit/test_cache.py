"""Issue 18: the optional prediction cache (``serving/cache.py``), in process through the data plane, on a
private model store of tiny real ONNX models whose answer depends on the row: the LRU's bound, keys never
shared across model tags, partial hits answered in order and equal to uncached answers, rows dropped on
unload; and a real ``redis-server`` shared by two data planes, killed mid-run.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import redis
import yaml
from bentoml._internal.models import ModelStore

from common import config, metrics, store
from experiments.ledger import Ledger
from experiments.live import LiveExperiments
from experiments.repositorystore import RepositoryStore
from experiments.shadow import Shadow
from harness.server import free_port
from serving.batching import Batcher
from serving.cache import MemoryBackend, PredictionCache, RedisBackend
from serving.catalog import Catalog
from serving.dataplane import DataPlane
from serving.repository import UNLOADED, ModelRepository
from serving.types import InferenceRequest
from tests import onnx_models

CLASSES = ["a", "b", "c"]
TABLE_ROWS = 4
"""Row ``i`` (first feature ``i``) answers softmax(logits[i]): a different answer per row and per model."""
TAGS = {"left": "cache_left:v1", "right": "cache_right:v1"}


def logits(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(TABLE_ROWS, len(CLASSES))).astype(np.float32)


@pytest.fixture(scope="module")
def private_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    models = ModelStore(tmp_path_factory.mktemp("models"))
    for seed, tag in enumerate(TAGS.values()):
        model = onnx_models.lookup_model(logits(seed), features=2)
        store.save(tag, labels={"runtime": "onnxruntime", "family": "toy", "version": "v1"},
                   metadata={"input_shape": [2], "classes": CLASSES, "onnx_input": "input",
                             "onnx_probabilities_output": "probabilities"},
                   write=lambda folder, m=model: (onnx.save(m, folder / "model.onnx"), "model.onnx")[1],
                   test_probs=np.zeros((1, len(CLASSES))), into=models)
    return models


class Plane:
    """A data plane over the private store, with ``cache`` (or none), and what it was built from."""

    def __init__(self, private_store: ModelStore, folder: Path, cache: PredictionCache | None):
        folder.mkdir(exist_ok=True)
        path = folder / "config.yaml"
        path.write_text(yaml.safe_dump({"experiments": {"toy": {"salt": "s", "variants": [
            {"name": "left", "model": TAGS["left"], "weight": 1},
            {"name": "right", "model": TAGS["right"], "weight": 0}]}}}))
        self.settings = config.load(path)
        self.catalog = Catalog(self.settings, {tag: private_store.get(tag) for tag in self.settings.model_tags()})
        self.catalog.load_runtimes()
        self.ledger = Ledger(self.settings.store, f"sqlite:///{folder / 'experiments.sqlite'}", {"toy": CLASSES})
        self.queue = Batcher(self.catalog.runtimes, self.settings.batching)
        live = LiveExperiments(path, self.ledger, self.catalog.availability, self.catalog.declare)
        self.dataplane = DataPlane(self.catalog, live, self.queue,
                                   Shadow(self.catalog.runtimes, self.settings.service.shadow_queue, self.ledger),
                                   self.settings.limits.max_rows, self.ledger, cache)

    async def answer(self, first_features: list[int], variant: str = "left") -> np.ndarray:
        rows = np.asarray([[f, 0.5] for f in first_features], np.float32)
        [answer] = await self.dataplane.infer("unit-cache", [InferenceRequest("toy", rows, variant=variant)])
        return np.asarray(answer.probabilities, np.float32)

    def close(self) -> None:
        if self.ledger.log is not None:
            self.ledger.log.close()


@pytest.fixture()
def uncached(private_store: ModelStore, tmp_path: Path) -> Iterator[Plane]:
    plane = Plane(private_store, tmp_path / "uncached", None)
    yield plane
    plane.close()


@pytest.fixture()
def memory(private_store: ModelStore, tmp_path: Path) -> Iterator[tuple[Plane, MemoryBackend]]:
    backend = MemoryBackend(max_rows=100)
    plane = Plane(private_store, tmp_path / "memory", PredictionCache(backend))
    yield plane, backend
    plane.close()


def cache_rows(tag: str, outcome: str) -> float:
    return sum(metrics.counter_totals(metrics.collect(), "bundle_cache", (), model_tag=tag, outcome=outcome).values())


def runtime_rows(tag: str) -> float:
    """Rows the runtime of ``tag`` was called with (the sum of ``bundle_batch_rows``)."""
    return sum(sample.value for metric in metrics.collect() for sample in metric.samples
               if sample.name == "bundle_batch_rows_sum" and sample.labels.get("model_tag") == tag)


def test_the_lru_keeps_its_bound_and_drops_the_least_recently_used() -> None:
    backend = MemoryBackend(max_rows=3)
    probabilities = np.eye(4, dtype=np.float32)

    async def scenario() -> list:
        await backend.put("m:1", [b"0", b"1", b"2"], probabilities[:3])
        await backend.get("m:1", [b"0"])  # used: "1" is now the least recently used
        await backend.put("m:1", [b"3"], probabilities[3:])
        return await backend.get("m:1", [b"0", b"1", b"2", b"3"])

    found = asyncio.run(scenario())
    assert len(backend) == 3
    assert [None if f is None else int(f.argmax()) for f in found] == [0, None, 2, 3]


def test_partial_hits_queue_only_the_misses_and_answer_in_order(memory: tuple[Plane, MemoryBackend],
                                                               uncached: Plane) -> None:
    plane, _ = memory
    tag = TAGS["left"]
    hits, misses = cache_rows(tag, "hit"), cache_rows(tag, "miss")

    async def scenario() -> tuple:
        await plane.answer([0, 1])
        queued = runtime_rows(tag)
        partial = await plane.answer([2, 0, 3, 1, 0])
        return runtime_rows(tag) - queued, partial, await plane.answer([2, 0, 3, 1, 0])

    queued, partial, all_hits = asyncio.run(scenario())
    expected = asyncio.run(uncached.answer([2, 0, 3, 1, 0]))
    assert queued == 2  # rows 2 and 3 only
    assert np.array_equal(partial, expected) and np.array_equal(all_hits, expected)
    assert len({tuple(p) for p in expected}) == 4  # the toy model's answers do differ by row
    assert cache_rows(tag, "hit") - hits == 3 + 5
    assert cache_rows(tag, "miss") - misses == 2 + 2


def test_keys_are_never_shared_across_model_tags(memory: tuple[Plane, MemoryBackend], uncached: Plane) -> None:
    plane, _ = memory
    right_hits = cache_rows(TAGS["right"], "hit")

    async def scenario() -> tuple:
        left = await plane.answer([0, 1, 2])
        return left, await plane.answer([0, 1, 2], variant="right")

    left, right = asyncio.run(scenario())
    assert cache_rows(TAGS["right"], "hit") == right_hits
    assert np.array_equal(right, asyncio.run(uncached.answer([0, 1, 2], variant="right")))
    assert not np.array_equal(left, right)


def test_unloading_a_model_drops_its_rows(memory: tuple[Plane, MemoryBackend]) -> None:
    plane, backend = memory
    asyncio.run(plane.answer([0, 1, 2]))
    asyncio.run(plane.answer([0, 1], variant="right"))
    assert len(backend) == 5
    wishes = RepositoryStore(plane.ledger.store)
    repository = ModelRepository(plane.catalog, plane.queue, wishes, plane.settings.repository, 30,
                                 plane.dataplane._cache)
    wishes.request(TAGS["right"], UNLOADED, "test")
    repository.poll()
    assert TAGS["right"] not in plane.catalog.runtimes
    assert len(backend) == 3  # the left model's rows stay
    hits = cache_rows(TAGS["left"], "hit")
    asyncio.run(plane.answer([0, 1, 2]))
    assert cache_rows(TAGS["left"], "hit") - hits == 3


# -- Redis ----------------------------------------------------------------------------------------------


class RedisServer:
    """A real ``redis-server`` on a free port in a temporary directory, nothing saved to disk."""

    def __init__(self, folder: Path):
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: `make tools` installs it (apt-get install redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        client.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture()
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.kill()


def test_redis_is_shared_and_a_dead_redis_costs_hits_never_answers(
        private_store: ModelStore, tmp_path: Path, redis_server: RedisServer, uncached: Plane) -> None:
    """Two data planes (two workers, or two replicas) over one Redis: what one answered, the other finds.
    Redis killed mid-run: both still answer the same, the failed rows counted as errors."""
    backends = [RedisBackend(redis_server.url, ttl_s=60) for _ in range(2)]
    first, second = (Plane(private_store, tmp_path / f"worker{i}", PredictionCache(b)) for i, b in enumerate(backends))
    tag = TAGS["left"]
    expected = asyncio.run(uncached.answer([3, 1, 0, 2]))
    before = {outcome: cache_rows(tag, outcome) for outcome in ("hit", "miss", "error")}

    async def scenario() -> list[np.ndarray]:
        answers = [await first.answer([3, 1, 0, 2])]
        answers.append(await second.answer([3, 1, 0, 2]))  # all hits: first stored them
        queued = runtime_rows(tag)
        backends[0].drop(tag)  # a new generation (a worker loaded or unloaded the model): misses everywhere
        answers.append(await second.answer([3, 1, 0, 2]))
        assert runtime_rows(tag) - queued == 4
        redis_server.kill()
        answers += [await first.answer([3, 1, 0, 2]), await second.answer([3, 1, 0, 2])]
        backends[1].drop(tag)  # Redis down: logged, never raised
        for backend in backends:
            await backend.close()
        return answers

    try:
        answers = asyncio.run(scenario())
    finally:
        first.close()
        second.close()
    assert all(np.array_equal(answer, expected) for answer in answers)
    counted = {outcome: cache_rows(tag, outcome) - n for outcome, n in before.items()}
    assert counted == {"hit": 4, "miss": 4 + 4, "error": 4 + 4}
