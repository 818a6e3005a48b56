"""What every family's trainer hands back, so one loop can evaluate, store and report them all."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np


@dataclass
class Trained:
    """A fitted model in the form it will be stored in."""

    framework: str
    format: str
    write: Callable[[Path], str]
    predict_proba: Callable[[np.ndarray], np.ndarray]
    """Probabilities from the stored form (not the training-time object), so a reload must match."""
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    libraries: tuple[str, ...] = ()
