"""A stored model's input and output contract, read from its metadata in the model store."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from common.errors import RequestError, TooLargeError


@dataclass(frozen=True)
class Schema:
    input_shape: tuple[int, ...]
    classes: tuple[str, ...]
    feature_names: tuple[str, ...] | None

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Schema:
        names = metadata.get("feature_names")
        return cls(
            input_shape=tuple(int(d) for d in metadata["input_shape"]),
            classes=tuple(str(c) for c in metadata["classes"]),
            feature_names=tuple(names) if names else None,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "shape": ["N", *self.input_shape],
            "dtype": "float32",
            "classes": list(self.classes),
            **({"features": list(self.feature_names)} if self.feature_names else {}),
        }

    def batch(self, inputs: Any, field: str, max_rows: int) -> np.ndarray:
        """One row or a batch of rows as a float32 (N, *input_shape) array, or a 4xx naming ``field``."""
        expected = f"float32 rows of shape {list(self.input_shape)} (or a batch of them)"
        try:
            array = np.asarray(inputs, dtype=np.float32)
        except (TypeError, ValueError, OverflowError):
            raise RequestError(field, "not a numeric array of consistent shape", expected) from None
        if array.shape == self.input_shape:
            array = array[None]
        if array.shape[1:] != self.input_shape or array.shape[0] == 0:
            raise RequestError(field, f"shape {list(array.shape)} does not fit the model", expected)
        if array.shape[0] > max_rows:
            raise TooLargeError(field, f"{array.shape[0]} rows is more than the limit", f"at most {max_rows} rows")
        if not np.isfinite(array).all():
            raise RequestError(field, "contains NaN or infinity", "finite numbers")
        return array
