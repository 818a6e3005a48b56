"""Experiment health: traffic share against weights (sample-ratio mismatch), latency, labels, shadow.

Served as ``GET /experiments`` (:func:`overview`) and ``GET /experiments/{model}/report``
(:func:`build`); ``python -m experiments.report --url URL`` prints it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any
from collections.abc import Mapping

from prometheus_client import Metric

from common import metrics
from common.config import Experiment
from common.metrics import VariantTotals
from experiments.router import Router
from experiments.sequential import srm_p_value

SRM_P_VALUE = 0.001
"""A p-value below this flags a sample-ratio mismatch (the usual, conservative bar)."""
MIN_ROWS_FOR_SRM = 100


def traffic(model: str, experiment: Experiment, epoch: str, totals: VariantTotals) -> dict[str, dict[str, float]]:
    """Routed (not pinned) rows per variant under the weights in force, with shares."""
    counts = {variant: ok + errors for (name, variant, at, pinned), (ok, errors) in totals.items()
              if name == model and at == epoch and not pinned}
    return shares(experiment, counts)


def shares(experiment: Experiment, counts: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """``counts`` per variant beside the share the weights configure and the share observed."""
    total_weight = sum(v.weight for v in experiment.variants)
    total = sum(counts.get(v.name, 0.0) for v in experiment.variants)
    return {
        v.name: {
            "count": counts.get(v.name, 0.0),
            "configured_share": v.weight / total_weight,
            "observed_share": counts.get(v.name, 0.0) / total if total else 0.0,
        }
        for v in experiment.variants
    }


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus' ``histogram_quantile``: linear within the bucket (prometheus_client has none)."""
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            width = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / width if width else 1.0)
        lower_bound, lower_count = bound, count
    return lower_bound


def overview(router: Router, totals: VariantTotals) -> dict[str, Any]:
    """Every experiment: the configuration in force, routed rows per variant, configured against observed share."""
    out = {}
    for model in router.models:
        experiment = router.experiment(model)
        shares = traffic(model, experiment, router.epoch(model), totals)
        out[model] = {
            "salt": experiment.salt,
            "epoch": router.epoch(model),
            "variants": [{"name": v.name, "model_tag": v.model, "weight": v.weight, **shares[v.name]}
                         for v in experiment.variants],
            "shadow": experiment.shadow.model_dump() if experiment.shadow else None,
        }
    return {"experiments": out}


def build(model: str, experiment: Experiment, epoch: str, samples: list[Metric], totals: VariantTotals,
          counted: str) -> dict[str, Any]:
    """The report: routed rows from ``totals`` (``counted``: where, see ``Ledger.traffic``), latency,
    labels and shadow outcomes from ``samples``, this replica's metrics."""
    shares = traffic(model, experiment, epoch, totals)
    labels = metrics.counter_totals(samples, "bundle_predicted_labels", ("variant", "label"), model=model)
    shadow = metrics.counter_totals(samples, "bundle_shadow", ("variant", "outcome"), model=model)
    variants = []
    for v in experiment.variants:
        buckets = metrics.histogram_buckets(samples, "bundle_inference_seconds", model_tag=v.model)
        p50, p95 = quantile(buckets, 0.5), quantile(buckets, 0.95)
        variants.append({
            "name": v.name,
            "model_tag": v.model,
            "weight": v.weight,
            **shares[v.name],
            "latency_ms": {"p50": p50 and p50 * 1000, "p95": p95 and p95 * 1000},
            "labels": {label: n for (name, label), n in sorted(labels.items()) if name == v.name},
        })
    report: dict[str, Any] = {"model": model, "epoch": epoch, "variants": variants, "counts_from": counted}
    report.update(_srm(variants))
    if experiment.shadow:
        outcomes = {o: n for (name, o), n in shadow.items() if name == experiment.shadow.name}
        compared = outcomes.get("agree", 0.0) + outcomes.get("disagree", 0.0)
        report["shadow"] = {"name": experiment.shadow.name, "model_tag": experiment.shadow.model, **outcomes,
                            "agreement": outcomes.get("agree", 0.0) / compared if compared else None}
    return report


def srm(experiment: Experiment, units: Mapping[str, float]) -> dict[str, Any]:
    """The sample-ratio test of randomization units (users, and requests without one) per variant
    against the weights: the decision's guardrail. Rows of one sticky user, or of one anonymous
    request, all land on one variant, so a test on rows would see a mismatch in any split of a few
    heavy users; the unit is what the router randomizes."""
    return _srm([{"name": name, **share} for name, share in shares(experiment, units).items()], "users",
                always_valid=True)


def by_user(report: dict[str, Any], users: dict[str, Any]) -> None:
    """Make the user-level test (:func:`srm`) the report's verdict once it has enough users, keeping
    the row-level one as ``srm_by_row``: a request of many rows, or a heavy sticky user, lands whole on
    one variant, so rows are clustered and their chi-square flags mismatches in a fair split."""
    if users["p_value"] is None:
        report["srm_unit"] = "row"
        return
    report["srm_by_row"] = {key: report[key] for key in ("rows", "chi_square", "p_value", "verdict", "test")}
    report.update(users, srm_unit="user")


def _srm(variants: list[dict[str, Any]], unit: str = "routed rows", always_valid: bool = False) -> dict[str, Any]:
    """The chi-square test of ``variants``' counts against their configured shares; ``always_valid``:
    the verdict from :func:`experiments.sequential.srm_p_value` instead, a p-value that stays valid
    however often it is read (the chi-square's statistic is kept, for reference)."""
    total = sum(v["count"] for v in variants)
    if total < MIN_ROWS_FOR_SRM:
        return {"rows": total, "chi_square": None, "p_value": None,
                "verdict": f"not enough traffic yet ({total:.0f} {unit}, need {MIN_ROWS_FOR_SRM})"}
    leaked = [v["name"] for v in variants if v["configured_share"] == 0 and v["count"] > 0]
    live = [v for v in variants if v["configured_share"] > 0]
    if len(live) > 1:  # expected counts out of the live variants' own total: a leak must not break the sums
        from scipy.stats import chisquare

        live_total = sum(v["count"] for v in live)
        statistic, p_value = chisquare([v["count"] for v in live],
                                       [v["configured_share"] * live_total for v in live])
        if always_valid:
            p_value = srm_p_value([v["count"] for v in live], [v["configured_share"] for v in live])
    else:  # one live variant: no split to test (no degree of freedom); only a leak is a mismatch
        statistic, p_value = 0.0, 1.0
    if leaked or p_value < SRM_P_VALUE:
        worst = max(variants, key=lambda v: abs(v["observed_share"] - v["configured_share"]))
        verdict = (f"SRM detected: {worst['name']} got {worst['observed_share']:.1%} of traffic "
                   f"for a configured {worst['configured_share']:.1%} (p={p_value:.2g})")
    else:
        verdict = "healthy"
    return {"rows": total, "chi_square": float(statistic), "p_value": float(p_value), "verdict": verdict,
            "test": "always-valid (Dirichlet-multinomial)" if always_valid else "chi-square"}


def render(report: dict[str, Any]) -> str:
    from common.tables import markdown

    rows = [[v["name"], v["model_tag"], v["weight"], f"{v['configured_share']:.1%}",
             f"{v['observed_share']:.1%}", int(v["count"]), v["latency_ms"]["p50"], v["latency_ms"]["p95"],
             ", ".join(f"{k}:{int(n)}" for k, n in v["labels"].items())] for v in report["variants"]]
    lines = [f"experiment {report['model']} (weights epoch {report['epoch']})",
             markdown(["variant", "model", "weight", "configured", "observed", "rows", "p50 ms", "p95 ms",
                       "labels"], rows)]
    if "shadow" in report:
        s = report["shadow"]
        lines.append(f"shadow {s['name']} ({s['model_tag']}): agreement {s['agreement']}, "
                     f"errors {s.get('error', 0):.0f}, dropped {s.get('dropped', 0):.0f}")
    p = report["p_value"]
    lines.append(f"sample-ratio test by {report.get('srm_unit', 'row')} ({report.get('test', 'chi-square')}): "
                 f"chi2={report['chi_square']}, p={p if p is None else f'{p:.3g}'}")
    lines.append(f"verdict: {report['verdict']}")
    r = report.get("rollout")
    if r and "error" in r:
        lines.append(f"rollout: unavailable ({r['error']})")
    elif r:
        lines.append(f"rollout of {r['candidate']}: {r['state']} at step {r['step'] + 1}/{len(r['steps'])} "
                     f"({r['step_share']:g}%), {r['labels']} labels in {r['seconds']:.0f} s at this step"
                     + (f"; next needs: {'; '.join(r['next'])}" if r["next"] else f"; {r['reason']}"))
    outcomes = report.get("outcomes")
    if outcomes and "error" in outcomes:
        lines.append(f"outcomes: unavailable ({outcomes['error']})")
    elif outcomes:
        lines.extend(_render_outcomes(outcomes))
    return "\n".join(lines)


def _render_outcomes(outcomes: dict[str, Any]) -> list[str]:
    """Per variant the label accounting and outcome metrics, whole and recent accuracy side by side,
    then a confusion matrix per labelled variant."""
    from common.tables import markdown

    recent = outcomes["recent"]
    rows = []
    for name, m in outcomes["variants"].items():
        counts, delay = outcomes["labels"].get(name, {}), m["label_delay_seconds"]
        rows.append([name, counts.get("served"), m["labelled"], counts.get("pending"), counts.get("expired"),
                     _accuracy(m["accuracy"]), _accuracy(recent["variants"].get(name, {}).get("accuracy")),
                     m["log_loss"] and round(m["log_loss"], 4), m["brier"] and round(m["brier"], 4),
                     m["reward"] and round(m["reward"]["mean"], 4),
                     delay and f"{_duration(delay['median'])} / {_duration(delay['p90'])}"])
    lines = [markdown(["variant", "served", "labelled", "pending", "expired", "accuracy [95% Wilson]",
                       f"accuracy, last {_duration(recent['window_s'])}", "log loss", "Brier", "mean reward",
                       "label delay median / p90"], rows)]
    for name, m in outcomes["variants"].items():
        if m["accuracy"]:
            classes, matrix = m["confusion"]["labels"], m["confusion"]["matrix"]
            lines.append(f"confusion of {name} (rows: true class, columns: answered)")
            lines.append(markdown(["true \\ answered", *classes], [[c, *n] for c, n in zip(classes, matrix)]))
    return lines


def _accuracy(accuracy: dict[str, Any] | None) -> str:
    if not accuracy:
        return ""
    return f"{accuracy['value']:.4f} [{accuracy['low']:.4f}, {accuracy['high']:.4f}] n={accuracy['n']}"


def _duration(seconds: float) -> str:
    """Seconds as a person reads them: labels arrive within seconds, or hours later."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def main(argv: list[str] | None = None) -> int:
    import httpx

    parser = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__)
    parser.add_argument("models", nargs="*", help="logical models (default: all)")
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    args = parser.parse_args(argv)
    models = args.models or list(httpx.get(f"{args.url}/experiments", timeout=10).json()["experiments"])
    for model in models:
        response = httpx.get(f"{args.url}/experiments/{model}/report", timeout=10)
        if response.status_code != 200:
            print(f"{model}: {response.status_code} {response.text}", file=sys.stderr)
            return 1
        print(render(response.json()), end="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
