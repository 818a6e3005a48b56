"""Progressive rollout: a candidate ramped step by step to all the traffic, by itself, or taken out.

A rollout (``POST /experiments/{model}/rollout``) walks the candidate through its policy's steps
(``common.config.Rollout``: shares in percent ending at 100). At a step of share ``s`` the candidate's
weight ``w`` makes ``w / (w + others) = s / 100``, the others' weights unchanged (at 100 they are 0): the
router's rendezvous table only moves buckets *into* a variant whose weight rises against fixed
others, so a user who reached the candidate stays on it at every later step.

A step advances once it has ``min_labels`` labelled candidate predictions gathered since it began and
``min_seconds`` elapsed, the decision (``Ledger.decide``) for the candidate is not ``rollback`` and no
guardrail is breached; at the last step it needs a ``promote`` verdict, and the rollout is then
promoted. A ``rollback`` verdict or a breached guardrail rolls back at once (candidate weight 0) or
pauses, per ``on_breach``. Every weight change goes through ``LiveExperiments.update`` and is kept in
the weight history (source ``rollout``) with the numbers that justified it.

Every worker runs the controller; only the holder of the lease ``rollout`` acts (``experiments/
schedule.py``). Its step and the step's start live in the store (``experiments/rolloutstore.py``), so
a holder that dies is replaced within a few periods by one that continues from the recorded step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Protocol
from collections.abc import Callable, Mapping

from prometheus_client import Metric
from pydantic import ValidationError

from common import metrics
from common.config import Experiment, Rollout
from common.errors import ConflictError, NotFoundError, RequestError
from common.ids import worker_id
from common.logs import get_logger
from experiments.ledger import Ledger
from experiments.monitorstore import MonitorStore
from experiments.rolloutstore import (
    ABORTED,
    PAUSED,
    PROMOTED,
    ROLLED_BACK,
    RUNNING,
    UNFINISHED,
    RolloutStore,
)
from experiments.router import Router, epoch
from experiments.schedule import LeasedRound
from experiments.sequential import PROMOTE, ROLLBACK
from experiments.store import StoreUnavailable

log = get_logger("experiments")

LEASE = "rollout"
LEASE_TTL_PERIODS = 3.0
"""The controller's lease outlives three of its periods: a dead holder is replaced within them."""
SOURCE = "rollout"
"""The weight history's source of every change a rollout makes."""
HISTORY_LIMIT = 1000


class Live(Protocol):
    """What the controller needs of ``experiments.live.LiveExperiments``."""

    @property
    def router(self) -> Router: ...

    def update(self, model: str, weights: dict[str, float] | None, shadow: Any,
               on_change: Callable[[Experiment | None, Experiment], None] | None = None,
               source: str = "admin") -> Experiment: ...


def weights_at(experiment: Experiment, candidate: str, share: float) -> dict[str, float]:
    """The weights that give ``candidate`` ``share`` percent of routed traffic, the others' unchanged
    (at 100: the others 0, the candidate the whole sum). Others all at 0 leave the weights as they are:
    the candidate already has everything."""
    weights = {v.name: v.weight for v in experiment.variants}
    others = sum(w for name, w in weights.items() if name != candidate)
    if others <= 0:
        return weights
    if share >= 100:
        return {**dict.fromkeys(weights, 0.0), candidate: weights[candidate] + others}
    return {**weights, candidate: others * share / (100 - share)}


def share_of(experiment: Experiment, candidate: str) -> float:
    """The candidate's configured share of routed traffic, in percent."""
    total = sum(v.weight for v in experiment.variants)
    variant = experiment.variant(candidate)
    return 100 * variant.weight / total if variant is not None and total > 0 else 0.0


@dataclass(frozen=True)
class Assessment:
    """Where a running step stands: its evidence and what it still misses before it may move on."""

    labels: int
    """labelled candidate predictions gathered since the step began"""
    labels_total: int
    seconds: float
    decision: Mapping[str, Any]
    """the candidate's entry of ``Ledger.decide``: verdict, reason, interval, guardrails"""
    missing: list[str]

    @property
    def verdict(self) -> str:
        return str(self.decision["verdict"])

    @property
    def breached(self) -> bool:
        """A ``rollback`` verdict, which a breached guardrail also gives."""
        return self.verdict == ROLLBACK


class RolloutController:
    def __init__(self, ledger: Ledger, live: Live, every_s: float, holder: str | None = None,
                 samples: Callable[[], list[Metric]] = metrics.collect):
        """``holder``: this controller's name in the lease (default: the worker's id, ``replica/pid``);
        ``samples``: every worker's metrics, for the error-rate guardrail."""
        self.ledger = ledger
        self.live = live
        self.tables = RolloutStore(ledger.store)
        self._samples = samples
        self._schedule = LeasedRound(MonitorStore(ledger.store), LEASE, holder or worker_id(), every_s,
                                     LEASE_TTL_PERIODS)

    # -- the controller -------------------------------------------------------------------------------

    def schedule(self) -> None:
        """Run :meth:`round` every ``controller_every_s`` in a thread of this worker."""
        self._schedule.every_period(self.round)

    def close(self) -> None:
        self._schedule.close()

    def round(self, now: float | None = None) -> dict[str, str] | None:
        """One pass over every running rollout, if this controller holds (or takes) the lease: what it
        did per model; None when another controller holds the lease or the store is down."""
        now = time.time() if now is None else now
        return self._schedule.run(lambda: self._round(now), now)

    def _round(self, now: float) -> dict[str, str]:
        done = {}
        for rollout in self.tables.running():
            model = rollout["model"]
            try:
                done[model] = self._act(rollout, now)
            except StoreUnavailable:
                raise
            except Exception as err:  # one broken rollout must not stop the others
                log.error("rollout round failed", extra={"model": model, "reason": repr(err)})
                done[model] = f"failed: {err}"
                continue
            if not done[model].startswith("waiting"):
                log.info("rollout moved", extra={"model": model, "outcome": done[model]})
        return done

    def _act(self, rollout: dict[str, Any], now: float) -> str:
        model, candidate = rollout["model"], rollout["candidate"]
        policy = Rollout.model_validate(rollout["policy"])
        experiment = self.live.current().experiment(model)
        if experiment.variant(candidate) is None:
            self.tables.set_state(model, ABORTED, f"{candidate} is no longer a variant of {model}", now,
                                  from_states=(RUNNING,))
            return ABORTED
        experiment = self._hold(model, rollout, policy, experiment)
        found = self._assess(model, rollout, policy, experiment, now)
        where = _step_name(policy, rollout["step"])
        if found.breached:
            why = f"{where}: {found.decision['reason']}; {_numbers(found)}"
            if policy.on_breach == "pause":
                self.tables.set_state(model, PAUSED, f"paused at {why}", now, from_states=(RUNNING,))
                return PAUSED
            if self.tables.set_state(model, ROLLED_BACK, f"rolled back at {why}", now, from_states=(RUNNING,)):
                self._take_out(model, candidate, f"rolled back at {why}")
                metrics.ROLLBACKS.labels(model=model).inc()
            return ROLLED_BACK
        if found.missing:
            return "waiting for " + "; ".join(found.missing)
        if rollout["step"] == len(policy.steps) - 1:
            self.tables.set_state(model, PROMOTED, f"promoted at {where}: {_numbers(found)}", now,
                                  from_states=(RUNNING,))
            return PROMOTED
        step = rollout["step"] + 1
        reason = f"{_step_name(policy, step)} after {where}: {_numbers(found)}"
        if self.tables.set_step(model, step, found.labels_total, reason, now, from_step=rollout["step"]):
            self._hold(model, {**rollout, "step": step, "reason": reason}, policy, experiment)
        return f"advanced to {_step_name(policy, step)}"

    def _hold(self, model: str, rollout: Mapping[str, Any], policy: Rollout, experiment: Experiment) -> Experiment:
        """The experiment with the candidate at its step's share: written (with the step's reason) only
        when the weights in force differ, so a controller taking over re-applies nothing."""
        target = weights_at(experiment, rollout["candidate"], policy.steps[rollout["step"]])
        if all(math.isclose(v.weight, target[v.name], rel_tol=1e-9) for v in experiment.variants):
            return experiment
        return self.live.update(model, target, ..., self._recorder(model, rollout["reason"]), source=SOURCE)

    def _assess(self, model: str, rollout: Mapping[str, Any], policy: Rollout, experiment: Experiment,
                now: float) -> Assessment:
        candidate = rollout["candidate"]
        total = self.tables.labelled(model, candidate, experiment.decision.metric)
        labels, seconds = total - rollout["step_labels_start"], now - rollout["step_started_at"]
        decision = self.ledger.decide(model, experiment, epoch(experiment), self._samples())
        mine = next((c for c in decision["candidates"] if c["variant"] == candidate),
                    {"verdict": "continue", "reason": f"{candidate} is the control of {model}: nothing to decide",
                     "interval": [None, None], "guardrails": {}})
        missing = []
        if labels < policy.min_labels:
            missing.append(f"{policy.min_labels - labels} more labelled predictions of {candidate} at this step "
                           f"({labels} of {policy.min_labels})")
        if seconds < policy.min_seconds:
            missing.append(f"{policy.min_seconds - seconds:.1f} more seconds at this step "
                           f"({seconds:.1f} of {policy.min_seconds:g})")
        if rollout["step"] == len(policy.steps) - 1 and mine["verdict"] != PROMOTE:
            missing.append(f"a promote verdict (now {mine['verdict']}: {mine['reason']})")
        return Assessment(labels, total, seconds, mine, missing)

    def _take_out(self, model: str, candidate: str, reason: str) -> Experiment:
        """The candidate at weight 0, the others as they are; if they are all 0 (the last step), as they
        were before the rollout's last change."""
        experiment = self.live.current().experiment(model)
        others = {v.name: v.weight for v in experiment.variants if v.name != candidate}
        if not any(others.values()):
            last = next((c for c in self.ledger.history(model, HISTORY_LIMIT) if c["source"] == SOURCE), None)
            before = last["old_weights"] if last else {}
            others = {name: float(before.get(name, 0.0)) for name in others}
            if not any(others.values()):
                others[experiment.control.name] = 1.0
        return self.live.update(model, {**others, candidate: 0.0}, ..., self._recorder(model, reason),
                                source=SOURCE)

    def _recorder(self, model: str, reason: str) -> Callable[[Experiment | None, Experiment], None]:
        """The weight history entry of a change the rollout made (none when the weights were already so)."""
        def record(before: Experiment | None, after: Experiment) -> None:
            old, new = ({v.name: v.weight for v in e.variants} if e else {} for e in (before, after))
            if old != new:
                self.ledger.record_change(model, SOURCE, old, new, reason)
        return record

    # -- the admin's calls ----------------------------------------------------------------------------

    def start(self, model: str, candidate: str, overrides: Mapping[str, Any], reason: str = "",
              now: float | None = None) -> dict[str, Any]:
        """A rollout of ``candidate`` at its first step, its weights applied at once; the experiment's
        policy with ``overrides``. Refused (409) while another rollout of ``model`` is under way."""
        now = time.time() if now is None else now
        experiment = self.live.current().experiment(model)
        names = ", ".join(v.name for v in experiment.variants)
        if experiment.variant(candidate) is None:
            raise NotFoundError("candidate", f"unknown variant {candidate!r} of {model!r}", names)
        control = experiment.control.name
        if candidate == control:
            raise RequestError("candidate", f"{candidate!r} is the control of {model!r}",
                               f"another variant than the control: {names}")
        if not any(v.weight for v in experiment.variants if v.name != candidate):
            raise ConflictError("candidate", f"{candidate!r} is the only variant of {model!r} with weight",
                                "a control with weight to ramp against")
        try:
            policy = Rollout.model_validate({**experiment.rollout.model_dump(), **overrides})
        except ValidationError as err:
            first = err.errors()[0]
            raise RequestError(".".join(["policy", *(str(p) for p in first["loc"])]), first["msg"],
                               "steps increasing to 100, min_labels, min_seconds, on_breach") from None
        first_step = f"started by {reason or 'an admin'}: {_step_name(policy, 0)}"
        rollout = self.tables.start(model, candidate, control, policy,
                                    self.tables.labelled(model, candidate, experiment.decision.metric),
                                    first_step, now)
        self._hold(model, rollout, policy, experiment)
        return self.status(model, now)

    def pause(self, model: str, reason: str = "", now: float | None = None) -> dict[str, Any]:
        """Hold the step (the weights stay); the controller leaves it until :meth:`resume`."""
        now = time.time() if now is None else now
        self._change(model, self.tables.set_state(model, PAUSED, f"paused by {reason or 'an admin'}", now,
                                                  from_states=(RUNNING,)), RUNNING)
        return self.status(model, now)

    def resume(self, model: str, reason: str = "", now: float | None = None) -> dict[str, Any]:
        """Run again from the step it paused at, which starts over: its labels and time count anew."""
        now = time.time() if now is None else now
        rollout = self._get(model)
        experiment = self.live.current().experiment(model)
        labels = self.tables.labelled(model, rollout["candidate"], experiment.decision.metric)
        policy = Rollout.model_validate(rollout["policy"])
        why = f"resumed by {reason or 'an admin'} at {_step_name(policy, rollout['step'])}"
        self._change(model, self.tables.set_step(model, rollout["step"], labels, why, now,
                                                 from_step=rollout["step"], from_states=(PAUSED,)), PAUSED)
        self._hold(model, {**rollout, "reason": why}, policy, experiment)
        return self.status(model, now)

    def abort(self, model: str, reason: str = "", now: float | None = None) -> dict[str, Any]:
        """Stop the rollout and take the candidate out (weight 0)."""
        now = time.time() if now is None else now
        rollout = self._get(model)
        why = f"aborted by {reason or 'an admin'}"
        self._change(model, self.tables.set_state(model, ABORTED, why, now), "running or paused")
        self._take_out(model, rollout["candidate"], why)
        return self.status(model, now)

    def _change(self, model: str, done: bool, expected: str) -> None:
        if not done:
            state = self._get(model)["state"]
            raise ConflictError("model", f"the rollout of {model!r} is {state}", f"a rollout that is {expected}")

    def _get(self, model: str) -> dict[str, Any]:
        self.live.current().experiment(model)  # 404 naming the served models
        rollout = self.tables.get(model)
        if rollout is None:
            raise NotFoundError("model", f"no rollout of {model!r}", f"POST /experiments/{model}/rollout first")
        return rollout

    # -- what it shows --------------------------------------------------------------------------------

    def status(self, model: str, now: float | None = None) -> dict[str, Any]:
        """Step, share, labels and time at this step, what it still misses, state and the steps taken."""
        now = time.time() if now is None else now
        rollout = self._get(model)
        policy = Rollout.model_validate(rollout["policy"])
        experiment = self.live.current().experiment(model)
        step, state = rollout["step"], rollout["state"]
        out: dict[str, Any] = {
            "model": model, "candidate": rollout["candidate"], "control": rollout["control"], "state": state,
            "reason": rollout["reason"], "step": step, "steps": policy.steps, "step_share": policy.steps[step],
            "share": share_of(experiment, rollout["candidate"]), "policy": policy.model_dump(mode="json"),
            "started_at": rollout["started_at"], "step_started_at": rollout["step_started_at"],
            "updated_at": rollout["updated_at"],
            "seconds": (now if state in UNFINISHED else rollout["updated_at"]) - rollout["step_started_at"],
            "labels": self.tables.labelled(model, rollout["candidate"], experiment.decision.metric)
            - rollout["step_labels_start"],
            "next": None, "controller": self.tables.holder(LEASE)}
        if state in UNFINISHED:
            found = self._assess(model, rollout, policy, experiment, now)
            out["next"] = ([f"resume (paused: {rollout['reason']})"] if state == PAUSED else []) + found.missing
            out["decision"] = {k: found.decision.get(k) for k in ("verdict", "reason", "interval", "guardrails")}
        out["history"] = [{k: c[k] for k in ("at", "old_weights", "new_weights", "reason")}
                          for c in self.ledger.history(model, HISTORY_LIMIT)
                          if c["source"] == SOURCE and c["at"] >= rollout["started_at"]][::-1]
        return out

    def summary(self, model: str) -> dict[str, Any]:
        """``{"rollout": status}`` for the experiment's report when the model has a rollout, else nothing;
        ``{"rollout": {"error": ...}}`` when the store cannot say, so that a report never hides a rollout
        it could not read."""
        try:
            return {"rollout": self.status(model)} if self.tables.get(model) is not None else {}
        except StoreUnavailable as err:
            return {"rollout": {"error": str(err)}}


def _step_name(policy: Rollout, step: int) -> str:
    return f"step {step + 1}/{len(policy.steps)} ({policy.steps[step]:g}%)"


def _numbers(found: Assessment) -> str:
    """The evidence of a step as the weight history keeps it."""
    d = found.decision
    low, high = d.get("interval") or (None, None)
    interval = f"[{low:+.4f}, {high:+.4f}]" if low is not None and high is not None else "[none]"
    guardrails = ", ".join(f"{name} {g['value'] if g['value'] is None else round(g['value'], 4)} {g['state']}"
                           for name, g in d.get("guardrails", {}).items())
    return (f"{found.labels} labels in {found.seconds:.1f} s, decision {d['verdict']} with candidate - control "
            f"in {interval}, guardrails: {guardrails or 'none'}")
