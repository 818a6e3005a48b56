"""The experiment store as a serving worker uses it: outcomes in, evidence and decisions out.

One object per worker joins the pieces: the prediction log (written off the request path), feedback,
live outcome metrics per variant, the always-valid decision with its guardrails, and the history of
weight changes. Every call that reads or writes the store can meet a store that is down: reads raise
:class:`~experiments.store.StoreUnavailable` (answered 503 with Retry-After), writes that must not
fail the caller (a weight change's history) are counted and logged instead.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any
from collections.abc import Mapping, Sequence

import numpy as np
from prometheus_client import Metric

from common import metrics
from common.config import Experiment, Guardrails, Monitoring, Store
from common.ids import worker_id
from common.logs import get_logger
from common.metrics import VariantTotals
from experiments import outcomes, report, sequential
from experiments.drift import DriftMonitor
from experiments.predictionlog import PredictionLog
from experiments.records import AnswerRecord, Deferred, ShadowRecord
from experiments.router import epoch
from experiments.store import ExperimentStore, Joined, StoreUnavailable
from experiments.trafficstore import TrafficStore

log = get_logger("experiments")


class Ledger:
    def __init__(self, settings: Store, url: str, classes: Mapping[str, Sequence[str]],
                 monitoring: Monitoring = Monitoring()):
        self.settings = settings
        self.store = ExperimentStore(url)
        self._sample_fraction = monitoring.sample_fraction
        self.drift = DriftMonitor(self.store, monitoring)
        self._classes = classes
        self.log = (PredictionLog(self.store, settings.queue_rows, settings.flush_ms / 1000,
                                  settings.retention_days, settings.retention_rows,
                                  lambda: metrics.variant_totals(metrics.REQUESTS.collect()), worker_id())
                    if settings.log_predictions else None)
        self._verdicts: dict[tuple[str, str], str] = {}

    # -- the prediction log: the data plane's and the shadow's recorder -------------------------------

    @property
    def logging(self) -> bool:
        """Whether answers are logged: when not, the data plane builds no record at all."""
        return self.log is not None

    def answer(self, records: Sequence[AnswerRecord]) -> None:
        """Queue one request's answered groups for the log as one unit, so a flush writes all of its
        variants or none (a report read between two would see a split the router never made), and each
        group's inputs for the drift check when drawn for it (``monitoring.sample_fraction`` of groups):
        deferred objects, rows built later in the writer thread."""
        if self.log is not None:
            count = sum(len(r.prediction_ids) for r in records)
            hashed = self.settings.hash_user_ids
            self.log.submit(Deferred(count, lambda: [row for r in records for row in r.rows(hashed)]))
            for record in records:
                if random.random() < self._sample_fraction:
                    self.log.submit_samples(Deferred(len(record.prediction_ids), record.samples))

    def shadow(self, record: ShadowRecord) -> None:
        if self.log is not None:
            self.log.submit_shadow(Deferred(len(record.prediction_ids), record.rows))

    def status(self) -> dict[str, Any]:
        """The store's and the log's state, for ``/readyz`` detail: a store that is down degrades the
        experiments (no log, no feedback, no decision), never the answers, so the worker stays ready."""
        reachable, detail = self.store.healthy()
        out: dict[str, Any] = {"ok": True, "store": self.store.url, "reachable": reachable, "detail": detail}
        if self.log is not None:
            out["log"] = self.log.status()
        out["degraded"] = not reachable or (self.log is not None and not out["log"]["ok"])
        return out

    def traffic(self, samples: list[Metric], model: str | None = None) -> tuple[VariantTotals, str]:
        """Rows answered and failed per variant (of ``model`` or every model) and where they were counted:
        in the store, by every worker of every replica (each log writer copies its worker's totals), or,
        when the store cannot be reached or nothing is logged, in ``samples``, this replica's metrics."""
        if self.log is None:
            return metrics.variant_totals(samples, model), "this replica's metrics: store.log_predictions is off"
        try:
            return TrafficStore(self.store).totals(model), "store: every replica"
        except StoreUnavailable as err:
            return metrics.variant_totals(samples, model), f"this replica's metrics: {err}"

    # -- outcomes -------------------------------------------------------------------------------------

    def feedback(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Join outcomes to predictions, one result per item (see ``ExperimentStore.apply_feedback``)."""
        return self.store.apply_feedback(items, lambda model: list(self._classes.get(model, [])) or None)

    def outcomes(self, model: str, experiment: Experiment, epoch: str) -> dict[str, Any]:
        """Live outcome metrics per variant, over the whole experiment and the recent window, with the
        label accounting (served, labelled, pending, expired) and the shadow graded on the same rows."""
        joined = self.store.joined(model)
        rows = _rows(joined)
        names = [v.name for v in experiment.variants]
        classes = self._classes[model]
        now = time.time()
        since = now - self.settings.recent_window_s
        out: dict[str, Any] = {
            "variants": _with_served(outcomes.per_variant(rows, classes, variants=names),
                                     self.store.served_counts(model)),
            "recent": {"window_s": self.settings.recent_window_s,
                       "variants": _with_served(outcomes.per_variant(rows, classes, since=since, variants=names),
                                                self.store.served_counts(model, since))},
            "labels": self.store.label_counts(model, self.settings.label_horizon_days * 86_400, now),
            "srm_by_user": report.srm(experiment, self.store.assigned_units(model, epoch)),
        }
        self._export(model, out["variants"])
        return out

    def refresh(self, model: str, experiment: Experiment) -> None:
        """Recompute the outcome gauges (``bundle_outcome_*``) without anyone asking for a report: the
        scheduled round of one worker calls this, so that alert rules see live accuracy."""
        self.outcomes(model, experiment, epoch(experiment))

    def _export(self, model: str, per_variant: Mapping[str, Mapping[str, Any]]) -> None:
        """The headline outcome metrics as Prometheus gauges, refreshed whenever they are computed."""
        for variant, m in per_variant.items():
            accuracy = m["accuracy"]
            metrics.OUTCOME_LABELLED.labels(model=model, variant=variant).set(m["labelled"])
            if accuracy is not None:
                metrics.OUTCOME_ACCURACY.labels(model=model, variant=variant).set(accuracy["value"])
            if m["log_loss"] is not None:
                metrics.OUTCOME_LOG_LOSS.labels(model=model, variant=variant).set(m["log_loss"])
                metrics.OUTCOME_BRIER.labels(model=model, variant=variant).set(m["brier"])
            if m["reward"] is not None:
                metrics.OUTCOME_REWARD.labels(model=model, variant=variant).set(m["reward"]["mean"])

    # -- the decision ---------------------------------------------------------------------------------

    def decide(self, model: str, experiment: Experiment, epoch: str, samples: list[Metric]) -> dict[str, Any]:
        """Each candidate against the control: always-valid interval, guardrails, verdict and reason.

        A verdict that changed since the last one recorded is stored, so the decision has a history.
        """
        rule = experiment.decision
        joined = self.store.joined(model)
        routed = ~joined.pinned  # a pinned request chose its variant: only the split is a randomized comparison
        outcome, has = _outcome(joined, rule.metric)
        users = joined.unit
        control = experiment.control
        labels = self.store.label_counts(model, self.settings.label_horizon_days * 86_400)
        totals, counted = self.traffic(samples, model)
        guard = GuardrailInputs(errors=_errors(experiment, totals), counted=counted,
                                srm=_split(experiment, rule.guardrails, self.store.assigned_units(model, epoch)),
                                latency=self.store.variant_latency(model),
                                served={name: int(c["served"]) for name, c in labels.items()})
        if guard.srm["value"] is not None:
            metrics.SRM_P_VALUE.labels(model=model).set(guard.srm["value"])

        def arm(name: str) -> sequential.Sample:
            rows = routed & has & (joined.variant == name)
            return sequential.Sample(outcome[rows], users[rows])

        candidates = []
        for variant in experiment.variants:
            if variant.name == control.name:
                continue
            comparison = sequential.compare(arm(control.name), arm(variant.name), rule.margin, rule.alpha,
                                            rule.min_labels, bounds=_bounds(outcome[has], rule.metric))
            guardrails = _guardrails(variant.name, experiment, rule.guardrails, guard)
            verdict, reason = _verdict(comparison, guardrails)
            candidates.append({"variant": variant.name, "model_tag": variant.model, "verdict": verdict,
                               "reason": reason, "difference": comparison.estimate,
                               "interval": [comparison.lower, comparison.upper], "guardrails": guardrails,
                               **{k: v for k, v in comparison.as_dict().items()
                                  if k not in ("verdict", "reason", "estimate", "lower", "upper")}})
            self._remember(model, variant.name, verdict, candidates[-1])
        decision: dict[str, Any] = {
            "model": model, "control": control.name, "metric": rule.metric, "margin": rule.margin,
            "alpha": rule.alpha, "method": sequential.METHOD, "candidates": candidates, "counts_from": counted,
            "labels": labels,
        }
        if experiment.shadow is not None:
            decision["shadow"] = self._paired(model, experiment)
        return decision

    def _paired(self, model: str, experiment: Experiment) -> dict[str, Any]:
        """The shadow against the live answers of the same labelled rows (no user saw the shadow)."""
        rule, shadow = experiment.decision, experiment.shadow
        assert shadow is not None
        pairs = self.store.joined_shadow(model)
        rows = (pairs.shadow_variant == shadow.name) & (pairs.actual >= 0)
        comparison = sequential.paired(pairs.predicted[rows] == pairs.actual[rows],
                                       pairs.shadow_predicted[rows] == pairs.actual[rows], pairs.unit[rows],
                                       rule.margin, rule.alpha, rule.min_labels)
        return {"variant": shadow.name, "model_tag": shadow.model, "against": "the live answers",
                **comparison.as_dict()}

    def _remember(self, model: str, candidate: str, verdict: str, detail: Mapping[str, Any]) -> None:
        """Store a verdict when it differs from the last one this worker saw (or stored, after a restart)."""
        key = (model, candidate)
        if key not in self._verdicts:
            last = next((d for d in self.store.decisions(model) if d["candidate"] == candidate), None)
            self._verdicts[key] = last["verdict"] if last else ""
        if self._verdicts[key] != verdict:
            self.store.record_decision(model, candidate, verdict, detail)
            self._verdicts[key] = verdict

    # -- weight history -------------------------------------------------------------------------------

    def record_change(self, model: str, source: str, old: Mapping[str, float], new: Mapping[str, float],
                      reason: str) -> None:
        """Remember a weight change; a store that is down loses the entry (counted), never the change."""
        metrics.WEIGHT_CHANGES.labels(model=model, source=source).inc()
        try:
            self.store.record_weight_change(model, source, old, new, reason)
        except StoreUnavailable as err:
            metrics.LOG_DROPPED.labels(reason="history_store_error").inc()
            log.warning("weight change not recorded", extra={"model": model, "reason": str(err)})

    def history(self, model: str, limit: int) -> list[dict[str, Any]]:
        return self.store.history(model, limit)


def _with_served(per_variant: dict[str, dict[str, Any]], served: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    """``per_variant`` computed over the labelled rows (the join), with each variant's ``served``
    counting every prediction it served, labelled or not."""
    return {name: {**m, "served": served.get(name, 0)} for name, m in per_variant.items()}


def _rows(joined: Joined) -> outcomes.Rows:
    return outcomes.Rows(variant=joined.variant, predicted=joined.predicted, actual=joined.actual,
                         reward=joined.reward, log_loss=joined.log_loss, brier=joined.brier,
                         served_at=joined.served_at,
                         labelled_at=joined.labelled_at)


def _outcome(joined: Joined, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Per labelled row, the primary metric's outcome (1/0 correctness, or the reward) and whether it has one."""
    if metric == "reward":
        return joined.reward, np.isfinite(joined.reward)
    return (joined.predicted == joined.actual).astype(float), joined.actual >= 0


def _bounds(values: np.ndarray, metric: str) -> tuple[float, float]:
    """The range outcomes take: 0..1 for correctness; for rewards, what was seen (widened from 0..1)."""
    if metric == "accuracy" or not values.size:
        return sequential.ACCURACY_BOUNDS
    return min(0.0, float(values.min())), max(1.0, float(values.max()))


def _errors(experiment: Experiment, totals: VariantTotals) -> dict[str, tuple[float, float]]:
    """Rows failed and rows answered per variant, over every epoch (failures are not logged)."""
    out = {v.name: (0.0, 0.0) for v in experiment.variants}
    for (_, variant, _, _), (ok, errors) in totals.items():
        if variant in out:
            out[variant] = (out[variant][0] + errors, out[variant][1] + ok)
    return out


GUARDRAILS = {"error_rate": "error rate", "p95_latency_ratio": "p95 latency ratio", "srm": "sample ratio"}
"""Each guardrail's name in a verdict's reason."""


@dataclass(frozen=True)
class GuardrailInputs:
    """What the guardrails of every candidate are judged on, read once per decision."""

    errors: Mapping[str, tuple[float, float]]
    """rows failed and rows answered per variant (:func:`_errors`)"""
    counted: str
    """where those rows were counted (``Ledger.traffic``)"""
    srm: dict[str, Any]
    """the sample-ratio guardrail, the same for every candidate (:func:`_split`)"""
    latency: Mapping[str, float]
    """p95 latency in ms per variant, over every logged answer"""
    served: Mapping[str, int]
    """logged answers per variant, the rows ``latency`` is taken over"""


def _verdict(comparison: sequential.Comparison, guardrails: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
    """The comparison's verdict and reason, unless a guardrail overrides it: a breached one rolls back
    whatever the interval says, and ``promote`` needs every guardrail to hold, so one still ``unknown``
    makes it ``continue``."""
    breached = [(key, g) for key, g in guardrails.items() if g["state"] == "breached"]
    if breached:
        key, g = breached[0]
        return sequential.ROLLBACK, f"Guardrail breached: {GUARDRAILS[key]}: {g['reason']}."
    unknown = [f"the {GUARDRAILS[key]} is known: {g['reason']}" for key, g in guardrails.items()
               if g["state"] == "unknown"]
    if comparison.verdict == sequential.PROMOTE and unknown:
        return sequential.CONTINUE, f"Non-inferior, but promote once {'; and once '.join(unknown)}."
    return comparison.verdict, comparison.reason


def _guardrails(candidate: str, experiment: Experiment, limits: Guardrails,
                inputs: GuardrailInputs) -> dict[str, dict[str, Any]]:
    """Each guardrail's state (``holds``, ``breached`` or ``unknown``) for one candidate, with its value,
    its limit and a reason: what was measured, or why it is not known yet."""
    control = experiment.control.name
    errors, answered = inputs.errors[candidate]
    total = errors + answered
    if total:
        rate = errors / total
        error_rate = _state(rate, limits.max_error_rate, rate > limits.max_error_rate,
                            f"{candidate} failed {rate:.2%} of its {total:.0f} rows, "
                            f"limit {limits.max_error_rate:.2%}")
    else:
        error_rate = _state(None, limits.max_error_rate, None,
                            f"no rows of {candidate} counted yet, counting from {inputs.counted}")

    # A control at weight 0 (a rollout's last step) gets no more answers: it is judged on those it had.
    # Few of them make its p95 about their slowest, which errs toward holding, not toward a false rollback.
    counted_on = [candidate] if experiment.control.weight == 0 else [candidate, control]
    few = [f"{name} ({inputs.served.get(name, 0)} of {limits.min_answers})" for name in counted_on
           if inputs.served.get(name, 0) < limits.min_answers]
    mine, theirs = inputs.latency.get(candidate), inputs.latency.get(control)
    if few:
        latency = _state(None, limits.max_p95_latency_ratio, None, f"too few answers of {' and '.join(few)}")
    elif mine is None or not theirs:
        latency = _state(None, limits.max_p95_latency_ratio, None, f"no latency of {control} logged")
    else:
        ratio = mine / theirs
        latency = _state(ratio, limits.max_p95_latency_ratio, ratio > limits.max_p95_latency_ratio,
                         f"{candidate}'s p95 latency is {ratio:.2f}x {control}'s ({mine:.1f} ms against "
                         f"{theirs:.1f} ms), limit {limits.max_p95_latency_ratio:g}x")
    return {"error_rate": error_rate, "p95_latency_ratio": latency, "srm": dict(inputs.srm)}


def _split(experiment: Experiment, limits: Guardrails, units: Mapping[str, int]) -> dict[str, Any]:
    """The sample-ratio guardrail on ``units``, users per variant under the weights in force. A user on
    a variant at weight 0 breaches it at once. With one live variant (a rollout's last step, a promoted
    candidate) there is no split to test, the chi-square having no degree of freedom: every user goes to
    that variant, so it holds unless one leaked. Otherwise the chi-square test by user (``report.srm``)."""
    leaked = [v.name for v in experiment.variants if v.weight == 0 and units.get(v.name)]
    live = [v.name for v in experiment.variants if v.weight > 0]
    if leaked:
        return _state(None, limits.srm_p_value, True,
                      f"users reached {', '.join(leaked)} at weight 0 under the weights in force")
    if len(live) == 1:
        return _state(None, limits.srm_p_value, False, f"{live[0]} is the only live variant and has every user")
    srm = report.srm(experiment, units)
    if srm["p_value"] is None:
        return _state(None, limits.srm_p_value, None, srm["verdict"])
    return _state(srm["p_value"], limits.srm_p_value, srm["p_value"] < limits.srm_p_value,
                  f"sample ratio by user: {srm['verdict']}")


def _state(value: float | None, limit: float, breached: bool | None, reason: str) -> dict[str, Any]:
    """One guardrail's entry; ``breached`` None: not known yet."""
    state = "unknown" if breached is None else "breached" if breached else "holds"
    return {"value": value, "limit": limit, "state": state, "reason": reason}
