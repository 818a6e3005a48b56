"""Progressive rollouts in the experiment store (migration 0004): one row per experiment, the step it
is at and since when, so that whichever worker holds the controller lease continues from it.

Every change of a rollout is compare-and-set on the state (and step) it expects, so an admin's pause or
abort and the controller's round never both apply, and a finished rollout's row stays until the next
rollout of the model replaces it.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Sequence

import sqlalchemy as sa

from common.config import Rollout
from common.errors import ConflictError
from experiments.monitorstore import LEASES
from experiments.store import FEEDBACK, METADATA, PREDICTIONS, ExperimentStore

ROLLOUTS = sa.Table(
    "rollouts", METADATA,
    sa.Column("model", sa.Text, primary_key=True),
    sa.Column("candidate", sa.Text, nullable=False),
    sa.Column("control", sa.Text, nullable=False),
    sa.Column("policy", sa.JSON, nullable=False),  # common.config.Rollout, model_dump(mode="json")
    sa.Column("step", sa.Integer, nullable=False),  # index into policy.steps
    sa.Column("state", sa.Text, nullable=False),  # running | paused | promoted | rolled_back | aborted
    sa.Column("step_started_at", sa.Double, nullable=False),
    sa.Column("step_labels_start", sa.Integer, nullable=False),  # labelled rows of the candidate then
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("started_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
)


RUNNING, PAUSED, PROMOTED, ROLLED_BACK, ABORTED = "running", "paused", "promoted", "rolled_back", "aborted"
UNFINISHED = (RUNNING, PAUSED)
"""States of a rollout still under way: a model has at most one."""


class RolloutStore:
    def __init__(self, store: ExperimentStore):
        self.store = store

    def start(self, model: str, candidate: str, control: str, policy: Rollout, labels: int, reason: str,
              now: float) -> dict[str, Any]:
        """A new rollout of ``candidate`` at its first step (``labels``: the candidate's labelled rows so
        far), replacing a finished one; :class:`ConflictError` while one is under way for ``model``."""
        row = {"model": model, "candidate": candidate, "control": control, "policy": policy.model_dump(mode="json"),
               "step": 0, "state": RUNNING, "step_started_at": now, "step_labels_start": labels, "reason": reason,
               "started_at": now, "updated_at": now}
        with self.store._write() as conn:
            current = conn.execute(sa.select(ROLLOUTS.c.candidate, ROLLOUTS.c.state)
                                   .where(ROLLOUTS.c.model == model)).first()
            if current is not None and current.state in UNFINISHED:
                raise ConflictError("model", f"a rollout of {current.candidate!r} is {current.state} for {model!r}",
                                    f"POST /experiments/{model}/rollout/abort first")
            conn.execute(sa.delete(ROLLOUTS).where(ROLLOUTS.c.model == model))
            conn.execute(sa.insert(ROLLOUTS).values(**row))
        return row

    def get(self, model: str) -> dict[str, Any] | None:
        with self.store._read() as conn:
            row = conn.execute(sa.select(ROLLOUTS).where(ROLLOUTS.c.model == model)).first()
        return None if row is None else dict(row._mapping)

    def running(self) -> list[dict[str, Any]]:
        """Every rollout the controller acts on (state ``running``)."""
        with self.store._read() as conn:
            rows = conn.execute(sa.select(ROLLOUTS).where(ROLLOUTS.c.state == RUNNING).order_by(ROLLOUTS.c.model))
            return [dict(row._mapping) for row in rows]

    def set_step(self, model: str, step: int, labels: int, reason: str, now: float, *, from_step: int,
                 from_states: Sequence[str] = (RUNNING,)) -> bool:
        """Enter ``step`` (or start ``from_step`` again) now, running, with the candidate's labelled rows
        counted from ``labels``: only from ``from_step`` in one of ``from_states`` (compare-and-set, so a
        controller that lost its lease mid-round cannot move the rollout twice). Whether it did."""
        return self._change(model, from_states, from_step, step=step, state=RUNNING, step_started_at=now,
                            step_labels_start=labels, reason=reason, updated_at=now)

    def set_state(self, model: str, state: str, reason: str, now: float, *,
                  from_states: Sequence[str] = UNFINISHED) -> bool:
        """Move to ``state`` with ``reason``, only from one of ``from_states``: whether it did."""
        return self._change(model, from_states, None, state=state, reason=reason, updated_at=now)

    def _change(self, model: str, from_states: Sequence[str], from_step: int | None, **values: Any) -> bool:
        where = [ROLLOUTS.c.model == model, ROLLOUTS.c.state.in_(list(from_states))]
        if from_step is not None:
            where.append(ROLLOUTS.c.step == from_step)
        with self.store._write() as conn:
            return bool(conn.execute(sa.update(ROLLOUTS).where(*where).values(**values)).rowcount)

    def labelled(self, model: str, variant: str, metric: str) -> int:
        """Routed (not pinned) predictions of ``variant`` whose feedback grades ``metric`` (a class label
        for accuracy, a reward for reward), ever: a step's labels are this minus its count at the start."""
        p, f = PREDICTIONS.c, FEEDBACK.c
        graded = f.reward.is_not(None) if metric == "reward" else f.label_index.is_not(None)
        query = (sa.select(sa.func.count()).join_from(PREDICTIONS, FEEDBACK, p.prediction_id == f.prediction_id)
                 .where(p.model == model, p.variant == variant, sa.not_(p.pinned), graded))
        with self.store._read() as conn:
            return int(conn.scalar(query) or 0)

    def holder(self, lease: str) -> dict[str, Any] | None:
        """Who holds the lease ``lease`` and until when (``expires_at``), or None if nobody ever took it."""
        with self.store._read() as conn:
            row = conn.execute(sa.select(LEASES.c.holder, LEASES.c.expires_at).where(LEASES.c.name == lease)).first()
        return None if row is None else dict(row._mapping)
