"""The rows a twin is checked on beyond the test split; the gates themselves are ``common/parity.py``."""

from __future__ import annotations

import numpy as np

from common.datasets import Dataset


def whole_set(data: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Every row and label of the data set (training split first): the gates hold there too."""
    return np.concatenate([data.x_train, data.x_test]), np.concatenate([data.y_train, data.y_test])
