"""Issue: performance. The log writer encodes every row's probabilities with ``json_floats``: its fast
path (``repr`` of the list) must give exactly the text ``json.dumps`` gives, and non-finite values must
still come out as ``json.dumps`` writes them."""

from __future__ import annotations

import json

import numpy as np

from experiments.store import json_floats


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
