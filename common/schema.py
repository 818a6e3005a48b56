"""A stored model's input and output contract, read from its metadata in the model store."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from collections.abc import Mapping

import numpy as np

from common.errors import RequestError, TooLargeError

ANY_MODEL = "the model"
"""The name errors give a schema read without its logical model's name (a runtime's own)."""


def shape_text(dims: tuple[int | str, ...]) -> str:
    """A shape as Python and NumPy print it: ``(N, 30)``, ``(30,)``."""
    return f"({', '.join(map(str, dims))}{',' if len(dims) == 1 else ''})"


@dataclass(frozen=True)
class Schema:
    input_shape: tuple[int, ...]
    classes: tuple[str, ...]
    feature_names: tuple[str, ...] | None
    model: str = ANY_MODEL
    """The logical model (``cancer``) whose input this is, named in every error about it."""

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], model: str = ANY_MODEL) -> Schema:
        names = metadata.get("feature_names")
        return cls(
            input_shape=tuple(int(d) for d in metadata["input_shape"]),
            classes=tuple(str(c) for c in metadata["classes"]),
            feature_names=tuple(names) if names else None,
            model=model,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "shape": ["N", *self.input_shape],
            "dtype": "float32",
            "classes": list(self.classes),
            **({"features": list(self.feature_names)} if self.feature_names else {}),
        }

    def expects(self) -> str:
        """One row in words: ``30 features per row`` or ``8x8 images``."""
        if len(self.input_shape) == 1:
            return f"{self.input_shape[0]} features per row"
        return f"{'x'.join(map(str, self.input_shape))} images"

    def shapes(self, batched: bool = False) -> str:
        """The shapes that fit: a batch of rows, or (unless ``batched``) one row alone."""
        batch = shape_text(("N", *self.input_shape))
        return batch if batched else f"{batch} or {shape_text(self.input_shape)}"

    def mismatch(self, field: str, got: tuple[int, ...], batched: bool = False) -> RequestError:
        """The 400 for input of shape ``got``: what fits, in words and as body fields (the expected
        shape, and for tabular models the feature names in order) a client can act on."""
        hint = ""
        if batched and got == self.input_shape:
            hint = f"; {field} is a batch: one row alone is sent as a batch of one, [row]"
        elif math.prod(self.input_shape) in (math.prod(got), math.prod(got[1:]) if len(got) > 1 else None):
            hint = f"; the values fit if each row is reshaped to {shape_text(self.input_shape)}"
        details: dict[str, Any] = {"expected_shape": ["N", *self.input_shape], "got_shape": list(got)}
        if self.feature_names:
            details["features"] = list(self.feature_names)
        shapes = self.shapes(batched)
        return RequestError(field, f"{self.model} expects {self.expects()} (shape {shapes}); "
                                   f"got shape {shape_text(got)}{hint}", f"shape {shapes}", details)

    def batch(self, inputs: Any, field: str, max_rows: int, batched: bool = False) -> np.ndarray:
        """One row or a batch of rows as a float32 (N, *input_shape) array, or a 4xx naming ``field``.
        ``batched``: only a batch fits (a protocol whose field always holds a list of rows)."""
        try:
            array = np.asarray(inputs, dtype=np.float32)
        except (TypeError, ValueError, OverflowError):
            raise RequestError(field, "not a numeric array of consistent shape",
                               f"numbers in shape {self.shapes(batched)}") from None
        if array.shape == self.input_shape and not batched:
            array = array[None]
        if array.shape[1:] != self.input_shape:
            raise self.mismatch(field, array.shape, batched)
        if array.shape[0] == 0:
            raise RequestError(field, "no rows", f"at least one row of shape {shape_text(self.input_shape)}")
        if array.shape[0] > max_rows:
            raise TooLargeError(field, f"{array.shape[0]} rows is more than the limit",
                                f"at most {max_rows} rows")
        if not np.isfinite(array).all():
            raise RequestError(field, "contains NaN or infinity", "finite numbers")
        return array
