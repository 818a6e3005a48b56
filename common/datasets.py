"""The three demo datasets, split the same way everywhere.

Training, conversion, tests and benchmarks all call :func:`load` so that "the held-out test split"
means the same rows in every step; the split is stratified and seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SEED = 0
TEST_FRACTION = 0.25

# sklearn.datasets' loader of each family, by name: scikit-learn is imported when a dataset is
# loaded, not with this module, which the server's main process imports and never uses (importing
# scikit-learn brings SciPy and pandas, ~95 MiB a process).
_LOADERS = {"digits": "load_digits", "cancer": "load_breast_cancer", "wine": "load_wine"}
FAMILIES: tuple[str, ...] = tuple(_LOADERS)


@dataclass(frozen=True)
class Dataset:
    family: str
    source: str
    x_train: np.ndarray
    x_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    feature_names: list[str] | None
    input_shape: list[int]
    input_range: list[float]


def load(family: str) -> Dataset:
    """Load a family's data as float32 rows in its native shape (8x8 images for digits)."""
    if family not in _LOADERS:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    from sklearn import datasets as skdatasets
    from sklearn.model_selection import train_test_split

    raw = getattr(skdatasets, _LOADERS[family])()
    if family == "digits":
        x = raw.images.astype(np.float32)
        classes = [str(c) for c in raw.target_names]
        feature_names = None
    else:
        x = raw.data.astype(np.float32)
        classes = [str(c) for c in raw.target_names]
        feature_names = [str(f) for f in raw.feature_names]
    y = raw.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, stratify=y, random_state=SEED
    )
    return Dataset(
        family=family,
        source=f"sklearn.datasets.{_LOADERS[family]}",
        x_train=x_train,
        x_test=x_test,
        y_train=y_train,
        y_test=y_test,
        classes=classes,
        feature_names=feature_names,
        input_shape=list(x.shape[1:]),
        input_range=[float(x.min()), float(x.max())],
    )
