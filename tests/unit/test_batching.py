"""Issue: performance. The batch queue never holds a request while its runtime is free, batches what
queued during a call, keeps a failed call to its own requests, and sheds at once (503) what could
not be answered within ``batching.max_latency_ms``. On a real, deliberately slow ONNX model (a chain
of 512x512 products) in a private model store.
"""

from __future__ import annotations

import asyncio

import numpy as np
import onnx
import pytest
from bentoml._internal.models import ModelStore
from bentoml.exceptions import ServiceUnavailable
from onnx import TensorProto, helper, numpy_helper

from common import store
from common.config import Batching
from runtimes import Runtime, load_runtime
from serving.batching import Batcher

TAG = "toy_slow:v1"
WIDTH, DEPTH = 512, 200
"""About 100 MFLOP a row: milliseconds a call on one thread on any machine, so queues form."""


def slow_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    square = (rng.normal(size=(WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["input", "widen"], ["h0"])]
    nodes += [helper.make_node("MatMul", [f"h{i}", "square"], [f"h{i + 1}"]) for i in range(DEPTH)]
    nodes += [helper.make_node("MatMul", [f"h{DEPTH}", "narrow"], ["logits"]),
              helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)]
    graph = helper.make_graph(
        nodes, "slow", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(rng.normal(size=(2, WIDTH)).astype(np.float32), "widen"),
         numpy_helper.from_array(square, "square"),
         numpy_helper.from_array(rng.normal(size=(WIDTH, 2)).astype(np.float32), "narrow")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    models = ModelStore(tmp_path_factory.mktemp("models"))
    model = slow_model()
    store.save(TAG, labels={"runtime": "onnxruntime", "family": "toy", "version": "v1"},
               metadata={"input_shape": [2], "classes": ["a", "b"], "onnx_input": "input",
                         "onnx_probabilities_output": "probabilities"},
               write=lambda folder: (onnx.save(model, folder / "model.onnx"), "model.onnx")[1],
               test_probs=np.zeros((1, 2)), into=models)
    return load_runtime(models.get(TAG))


ROW = np.ones((1, 2), np.float32)


def test_concurrent_requests_share_calls_and_each_gets_its_own_rows(runtime: Runtime) -> None:
    calls: list[int] = []
    infer = runtime.infer
    runtime.infer = lambda batch: (calls.append(len(batch)), infer(batch))[1]  # type: ignore[method-assign]
    try:
        batcher = Batcher({TAG: runtime}, Batching(max_batch_size=16, max_latency_ms=60_000))
        inputs = [ROW * i for i in range(40)]

        async def scenario() -> list[np.ndarray]:
            first = asyncio.ensure_future(batcher.predict(TAG, inputs[0]))
            await asyncio.sleep(0.001)  # its call is under way when the others arrive
            return [await first, *await asyncio.gather(*(batcher.predict(TAG, rows) for rows in inputs[1:]))]

        answers = asyncio.run(scenario())
    finally:
        del runtime.infer
    assert calls[0] == 1, "the first request ran at once, alone: nothing is held while the runtime is free"
    assert calls[1:] == [16, 16, 7], "what queued during that call went in full batches, in order"
    for rows, answer in zip(inputs, answers):
        np.testing.assert_allclose(answer, runtime.predict(rows), rtol=1e-5)


def test_overload_is_shed_at_once_and_the_rest_answered(runtime: Runtime) -> None:
    batcher = Batcher({TAG: runtime}, Batching(max_batch_size=2, max_latency_ms=1))

    async def one() -> str:
        try:
            await batcher.predict(TAG, ROW)
        except ServiceUnavailable:
            return "shed"
        return "answered"

    async def scenario() -> list[str]:
        await one()  # one call measured: the queue now knows how long a call takes
        return await asyncio.gather(*(one() for _ in range(30)))

    outcomes = asyncio.run(scenario())
    # The first finds the runtime free; each later one would wait behind at least one call of ~ms,
    # far over the 1 ms allowed, and is refused before it queues.
    assert outcomes[0] == "answered" and outcomes.count("shed") == len(outcomes) - 1, outcomes


def test_a_failing_call_fails_only_its_own_requests(runtime: Runtime) -> None:
    batcher = Batcher({TAG: runtime}, Batching(max_batch_size=64, max_latency_ms=60_000))
    wrong = np.ones((1, 3), np.float32)  # onnxruntime refuses the shape: a real runtime failure

    async def scenario() -> list:
        running = asyncio.ensure_future(batcher.predict(TAG, ROW))
        await asyncio.sleep(0.001)  # the first call is under way; the next two queue behind it
        return await asyncio.gather(running, batcher.predict(TAG, ROW * 2), return_exceptions=True)

    assert [a.shape for a in asyncio.run(scenario())] == [(1, 2), (1, 2)]
    with pytest.raises(Exception, match="(?i)invalid|dimension|shape"):
        asyncio.run(batcher.predict(TAG, wrong))
    assert asyncio.run(batcher.predict(TAG, ROW)).shape == (1, 2), "the queue serves on after a failed call"
