"""Hypothesis strategies and budgets shared by the fuzz tests: in process (tests/unit) and over HTTP
(tests/e2e). Every budget is bounded (``max_examples``, no example database) so both run in CI in
well under three minutes on two cores.
"""

from __future__ import annotations

import io
import math
from typing import Any
from collections.abc import Iterator

import numpy as np
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from common import config
from tests import ROOT

CONFIG = config.load(ROOT / "config.yaml")
MODELS = sorted(CONFIG.experiments)
VARIANTS = sorted({v.name for e in CONFIG.experiments.values()
                   for v in [*e.variants, *([e.shadow] if e.shadow else [])]})
MAX_ROWS = CONFIG.limits.max_rows
REQUEST_TIMEOUT_S = 30  # "never a hang": an answer slower than this fails the example

# In process examples are cheap; over HTTP each is a request to a 2-worker server on 2 cores.
PHASES = [Phase.explicit, Phase.generate, Phase.shrink]  # no "explain": it reruns a failure many times
FAST = settings(max_examples=300, deadline=None, database=None, print_blob=True, phases=PHASES,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HTTP = settings(max_examples=300, deadline=None, database=None, print_blob=True, phases=PHASES,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])
SCHEMATHESIS_EXAMPLES = 15  # per operation and generation mode (positive, negative)

# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

# Lone surrogates are left out: no request can carry one (the JSON parser refuses the escape and
# multipart form fields are decoded as Latin-1), so Python-only strings would test nothing real.
TEXT = st.text(max_size=40)
LONG_TEXT = st.one_of(TEXT, st.text(min_size=200, max_size=2000), st.just(""), st.just("x" * 100_000))
HUGE_INTS = st.one_of(st.integers(min_value=2 ** 64), st.integers(max_value=-(2 ** 64)),
                      st.just(10 ** 400), st.just(-(10 ** 400)))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), HUGE_INTS, st.floats(), TEXT)
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                            st.dictionaries(TEXT, inner, max_size=4)),
                           max_leaves=30)
POISON = st.one_of(HUGE_INTS, st.sampled_from([math.nan, math.inf, -math.inf, None, True, "1.5", "x", "", [],
                                               {}, 1e39, -1e39, 2 ** 64, [1.0], {"a": 1.0}]))
FINITE = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32)


def _leaf_parents(value: list, path: tuple[int, ...] = ()) -> Iterator[tuple[int, ...]]:
    """Index paths of the lists in ``value`` (nested lists), outermost first."""
    yield path
    for i, item in enumerate(value):
        if isinstance(item, list):
            yield from _leaf_parents(item, (*path, i))


def _at(value: list, path: tuple[int, ...]) -> list:
    for i in path:
        value = value[i]
    return value


@st.composite
def inputs_for(draw: st.DrawFn, shape: tuple[int, ...], max_rows: int) -> Any:
    """Mostly near-valid ``inputs`` for a model of ``shape``, one fault at a time: a poisoned element
    (NaN, inf, null, text, a huge integer), a ragged or empty array, a wrong shape, too many rows, or
    any JSON at all; and valid rows and batches, so the faults are told apart from what is allowed."""
    kind = draw(st.sampled_from(["row", "batch", "poisoned", "ragged", "wrong_shape", "too_many", "empty",
                                 "json"]))
    if kind == "json":
        return draw(JSON_VALUES)
    if kind == "empty":
        return draw(st.sampled_from([[], [[]], [[[]]], [[], []]]))
    if kind == "too_many":
        dims = [max_rows + 1, *shape]
    elif kind == "row" or (kind != "batch" and draw(st.booleans())):
        dims = list(shape)
    else:
        dims = [draw(st.integers(1, min(max_rows, 3))), *shape]
    if kind == "wrong_shape":
        how = draw(st.sampled_from(["grow", "shrink", "add", "drop"]))
        axis = draw(st.integers(0, len(dims) - 1))
        if how == "grow":
            dims[axis] += 1
        elif how == "shrink":
            dims[axis] = max(0, dims[axis] - 1)
        elif how == "add":
            dims.insert(axis, draw(st.integers(1, 2)))
        elif len(dims) > 1:
            del dims[axis]
    value = draw(hnp.arrays(np.float32, dims, elements=FINITE)).tolist()
    if kind in ("poisoned", "ragged"):
        parents = [p for p in _leaf_parents(value) if _at(value, p)]
        parent = _at(value, draw(st.sampled_from(parents)))
        if kind == "poisoned":
            parent[draw(st.integers(0, len(parent) - 1))] = draw(POISON)
        else:
            parent.pop()
    return value


SHAPES = st.one_of(st.sampled_from([(13,), (30,), (8, 8)]),
                   st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple))

ANY_MODEL = st.one_of(st.sampled_from(MODELS), LONG_TEXT)
ANY_VARIANT = st.one_of(st.none(), st.sampled_from(VARIANTS), LONG_TEXT)
ANY_USER = st.one_of(st.none(), LONG_TEXT)


def encoded_image(pixels: np.ndarray, fmt: str, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


_RNG = np.random.default_rng(0)
REAL_IMAGES = [encoded_image(_RNG.integers(0, 256, (size, size), dtype=np.uint8), fmt, mode)
               for size, fmt, mode in [(8, "PNG", "L"), (32, "PNG", "RGB"), (28, "JPEG", "L"),
                                       (40, "JPEG", "RGB"), (16, "PNG", "RGBA"), (12, "PNG", "P")]]


@st.composite
def image_bytes(draw: st.DrawFn) -> bytes:
    """Arbitrary bytes, and real PNG/JPEG bytes truncated, bit-flipped or with a foreign tail."""
    real = draw(st.sampled_from(REAL_IMAGES))
    how = draw(st.sampled_from(["random", "real", "truncated", "truncated", "flipped", "flipped", "tail"]))
    if how == "random":
        return draw(st.binary(max_size=600))
    if how == "real":
        return real
    if how == "truncated":
        return real[:draw(st.integers(0, len(real) - 1))]
    if how == "tail":
        return real[:draw(st.integers(8, len(real)))] + draw(st.binary(max_size=200))
    data = bytearray(real)
    for _ in range(draw(st.integers(1, 6))):
        data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    return bytes(data)
