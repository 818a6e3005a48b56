"""The parity gates: how a model's probabilities compare to a reference's, and whether they pass.

Conversion stores a twin only if it passes them against its source (``conversion/twins.py``); the
live model repository loads a model only if its runtime passes them against the test-split
probabilities stored with it (``serving/repository.py``). One module, so both hold the same bar.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FP32_MAX_PROB_DIFF = 1e-4
"""An FP32 twin computes the same function: any larger difference is a conversion bug."""
INT8_MIN_AGREEMENT = 0.995
"""At most 1 label in 200 may change, on the test split and on the whole data set: the test split alone
(143 rows for cancer, 450 for digits) is a gate that one CPU's kernels pass and another's fail by a row."""
INT8_MAX_ACCURACY_DROP_POINTS = 1.0


@dataclass(frozen=True)
class Parity:
    """How a twin's probabilities on some rows compare to a reference's."""

    rows: int
    disagreements: int
    max_diff: float
    mean_diff: float
    accuracy: float
    reference_accuracy: float

    @property
    def agreement(self) -> float:
        return 1.0 - self.disagreements / self.rows

    @property
    def delta_points(self) -> float:
        return 100.0 * (self.accuracy - self.reference_accuracy)


def compare(twin: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> Parity:
    diff = np.abs(twin.astype(np.float64) - reference.astype(np.float64))
    predicted, expected = twin.argmax(axis=1), reference.argmax(axis=1)
    return Parity(
        rows=int(len(labels)),
        disagreements=int((predicted != expected).sum()),
        max_diff=float(diff.max()),
        mean_diff=float(diff.mean()),
        accuracy=float((predicted == labels).mean()),
        reference_accuracy=float((expected == labels).mean()),
    )


def failures(parity: Parity, precision: str, against: str) -> list[str]:
    """Every gate ``parity`` fails, each saying by how much; empty when the twin may be stored."""
    found = []
    if precision == "fp32":
        if parity.max_diff > FP32_MAX_PROB_DIFF:
            found.append(f"fp32 gate vs {against}: max |probability difference| {parity.max_diff:.3g} "
                         f"> {FP32_MAX_PROB_DIFF:g} (over by {parity.max_diff - FP32_MAX_PROB_DIFF:.3g})")
        if parity.disagreements:
            found.append(f"fp32 gate vs {against}: labels differ on {parity.disagreements} of "
                         f"{parity.rows} rows (must be identical)")
        return found
    if parity.agreement < INT8_MIN_AGREEMENT:
        found.append(f"int8 gate vs {against}: top-1 agreement {parity.agreement:.2%} < {INT8_MIN_AGREEMENT:.1%} "
                     f"(short by {100 * (INT8_MIN_AGREEMENT - parity.agreement):.2f} points)")
    if -parity.delta_points > INT8_MAX_ACCURACY_DROP_POINTS:
        found.append(f"int8 gate vs {against}: accuracy drop {-parity.delta_points:.2f} points "
                     f"> {INT8_MAX_ACCURACY_DROP_POINTS:g} (over by "
                     f"{-parity.delta_points - INT8_MAX_ACCURACY_DROP_POINTS:.2f})")
    return found
