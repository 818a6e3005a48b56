"""Issue: performance. The log writer encodes every row's probabilities (float32, as the runtimes answer)
with ``json_float32``: valid JSON that gives back each float32 exactly, in fewer digits than the float64
``repr``. ``json_floats`` (the exact float64 text of other vectors): its fast path (``repr`` of the
list) must give exactly the text ``json.dumps`` gives. Non-finite values come out of both as
``json.dumps`` writes them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.store import json_float32, json_floats


def test_finite_vectors_are_the_text_json_dumps_writes() -> None:
    rng = np.random.default_rng(0)
    vectors = [*rng.dirichlet(np.ones(10), size=200).astype(np.float32), *rng.normal(scale=1e6, size=(50, 3)),
               np.array([0.0, -0.0, 1e-300, 5e-324, 1.7976931348623157e308]), np.array([]), np.array([1, 2])]
    for vector in vectors:
        text = json_floats(vector)
        assert text == json.dumps([float(v) for v in vector])
        assert json.loads(text) == [float(v) for v in vector]


def test_non_finite_values_and_overflowing_sums_take_json_dumps() -> None:
    for vector in ([float("nan"), 0.5], [float("inf")], [1.7976931348623157e308, 1.7976931348623157e308]):
        assert json_floats(vector) == json.dumps(vector)



def test_float32_vectors_come_back_exactly_from_shorter_text() -> None:
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(10), size=200).astype(np.float32)
    for vector in probabilities:  # what the log holds most of: 9 digits a value, not 17
        assert len(json_float32(vector.tolist())) < len(json_floats(vector))
    vectors = [*probabilities,
               *(rng.normal(size=(200, 13)) * 10.0 ** rng.integers(-40, 38, size=(200, 1))).astype(np.float32),
               np.array([0.0, -0.0, 1.0, 1e-45, 1.1754944e-38, 3.4028235e38, -3.4028235e38], dtype=np.float32),
               np.array([], dtype=np.float32)]
    for vector in vectors:
        text = json_float32(vector.tolist())
        back = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
        assert np.array_equal(np.asarray(back, dtype=np.float32), vector)


def test_non_finite_float32_vectors_take_json_dumps() -> None:
    for vector in ([float("nan"), 0.5], [float("-inf"), 0.5]):
        assert json_float32(vector) == json.dumps(vector)
