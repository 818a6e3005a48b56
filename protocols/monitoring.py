"""Drift over REST and the dashboard a person looks at.

``GET /experiments/{model}/drift`` answers the latest drift check; ``POST`` (admin token) runs one now
on what has been sampled. ``GET /dashboard`` lists the experiments, ``GET /dashboard/{model}`` shows
one: traffic per variant against its weight, accuracy with intervals, latency, shadow agreement, label
delay, drift per feature (a heat map), the decision, the progressive rollout (what ``GET
/experiments/{model}/rollout`` answers) and the weight history.

The charts are SVG rendered here, server-side: the page needs no script, no charting library and no
network beyond this service (nothing to vendor, audit or keep in step with a CDN), it works with
JavaScript off, and a test reads every data point from the DOM (``data-*`` attributes). The page
reloads itself (``<meta http-equiv=refresh>``) every ``monitoring.dashboard_refresh_s``.
"""

from __future__ import annotations

import html
import math
import time
from typing import Any
from collections.abc import Mapping, Sequence

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from common import metrics
from common.config import Monitoring
from common.errors import NotFoundError
from experiments import timeline
from experiments.drift import CONFIDENCE, PREDICTIONS
from experiments.store import StoreUnavailable
from protocols.auth import AdminAuth
from protocols.guard import Paths
from protocols.rest import CurrentDataPlane, NativeRoute
from protocols.rollout import CurrentRollouts

DASHBOARD = "/dashboard"
GUARD = Paths(fixed=frozenset({DASHBOARD}))
router = APIRouter(route_class=NativeRoute)

WIDTH, HEIGHT, PAD = 640, 220, 36
CALIBRATION_AXIS_MIN = 0.1
"""The calibration chart's y axis reaches at least this error (well-calibrated models sit near 0)."""
"""A chart's SVG coordinate box; it scales to the page's width."""
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
PSI_SCALE = 0.5
"""PSI that fills a heat-map cell with full colour (0.25 is already a major shift)."""


@router.get("/experiments/{model}/drift")
async def drift(model: str, dataplane: CurrentDataPlane) -> dict[str, Any]:
    """The latest drift check: per variant and feature the statistics and ``drift``, the top drifting
    features and why."""
    dataplane.router.experiment(model)
    latest = await run_in_threadpool(dataplane.ledger.drift.latest, model)
    if latest is None:
        raise NotFoundError("model", f"no drift check of {model!r} yet",
                            f"POST /experiments/{model}/drift with the admin token, or wait for the schedule")
    return latest


@router.post("/experiments/{model}/drift", dependencies=[AdminAuth])
async def check_drift(model: str, dataplane: CurrentDataPlane) -> dict[str, Any]:
    """Admin: check drift now on what has been sampled (stored, exported, then answered)."""
    experiment = dataplane.router.experiment(model)
    return await run_in_threadpool(dataplane.ledger.drift.check, model, experiment)


@router.get(DASHBOARD, response_class=HTMLResponse)
async def dashboard(dataplane: CurrentDataPlane) -> HTMLResponse:
    """Every experiment: variants, weights, traffic, accuracy, drift, the latest verdicts."""
    settings = dataplane.ledger.drift.settings
    router_ = dataplane.router
    cards = []
    for model in router_.models:
        try:
            data = await run_in_threadpool(timeline.build, dataplane.ledger, model, router_.experiment(model), settings)
        except StoreUnavailable as err:
            cards.append(f"<section class=card><h2>{_e(model)}</h2><p class=warn>{_e(str(err))}</p></section>")
            continue
        cards.append(f"<section class=card><h2><a href='{DASHBOARD}/{_e(model)}'>{_e(model)}</a></h2>"
                     f"{_summary(data)}{_traffic_chart(data)}</section>")
    return _page("Experiments", f"<div class=grid>{''.join(cards)}</div>", settings)


@router.get(DASHBOARD + "/{model}", response_class=HTMLResponse)
async def experiment_page(model: str, dataplane: CurrentDataPlane, rollouts: CurrentRollouts) -> HTMLResponse:
    settings = dataplane.ledger.drift.settings
    experiment = dataplane.router.experiment(model)
    data = await run_in_threadpool(timeline.build, dataplane.ledger, model, experiment, settings)
    try:
        decision = await run_in_threadpool(dataplane.ledger.decide, model, experiment, dataplane.router.epoch(model),
                                           metrics.collect())
    except StoreUnavailable as err:
        decision = {"error": str(err)}
    rollout = await run_in_threadpool(rollouts.summary, model)
    body = (f"<p><a href='{DASHBOARD}'>all experiments</a></p><section class=card>{_summary(data)}</section>"
            f"<div class=grid><section class=card><h2>Traffic share against weight</h2>{_traffic_chart(data)}</section>"
            f"<section class=card><h2>Accuracy (95% Wilson interval)</h2>{_accuracy_chart(data)}</section>"
            f"<section class=card><h2>Calibration (expected calibration error)</h2>{_calibration_chart(data)}</section>"
            f"<section class=card><h2>Latency, labels, shadow</h2>{_latency_table(data)}</section>"
            f"<section class=card><h2>Drift per feature (PSI)</h2>{_heatmap(data)}</section>"
            f"<section class=card><h2>Decision now</h2>{_decision(decision)}<h2>Verdicts recorded</h2>"
            f"{_decisions(data)}</section>"
            f"<section class=card data-panel=rollout><h2>Rollout</h2>{_rollout(rollout)}</section>"
            f"<section class=card><h2>Weight history</h2>{_history(data)}</section></div>")
    return _page(f"Experiment {model}", body, settings)


# -- rendering ----------------------------------------------------------------------------------------

def _page(title: str, body: str, settings: Monitoring) -> HTMLResponse:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return HTMLResponse(
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width, initial-scale=1'>"
        f"<meta http-equiv=refresh content='{settings.dashboard_refresh_s}'>"
        f"<title>{_e(title)}</title><link rel=icon href='data:,'><style>{STYLE}</style></head><body>"
        f"<header><h1>{_e(title)}</h1><p class=muted>updated {stamp}; reloads every "
        f"{settings.dashboard_refresh_s} s; up to the last {settings.dashboard_window_s // 3600} h</p></header>"
        f"<main>{body}</main></body></html>")


STYLE = """
body{font:15px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#f6f7f9}
header{padding:.6rem 1rem;background:#fff;border-bottom:1px solid #ddd}h1{font-size:1.3rem;margin:0}
main{padding:1rem;max-width:1400px;margin:auto}.muted{color:#666;margin:.2rem 0}.warn{color:#b00}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,30rem),1fr));gap:1rem}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.8rem;margin-bottom:1rem;overflow-x:auto}
h2{font-size:1.05rem;margin:0 0 .5rem}svg{width:100%;height:auto;display:block}
table{border-collapse:collapse;font-size:.9rem}td,th{padding:.2rem .5rem;border-bottom:1px solid #eee;text-align:left}
.legend span{margin-right:1rem;white-space:nowrap}.drift{color:#b00;font-weight:600}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _legend(names: Sequence[str]) -> str:
    return "<p class=legend>" + "".join(
        f"<span><svg width=12 height=12 style='display:inline;width:12px'><rect width=12 height=12 "
        f"fill='{_color(i)}'/></svg> {_e(n)}</span>" for i, n in enumerate(names)) + "</p>"


def _axes(edges: Sequence[float], y_max: float, y_label: str) -> str:
    """Frame, y ticks and the time axis (minutes before now)."""
    out = [f"<rect x={PAD} y=8 width={WIDTH - PAD - 8} height={HEIGHT - PAD - 8} fill=none stroke='#ccc'/>"]
    for tick in (0.0, 0.5, 1.0):
        y = _y(tick * y_max, y_max)
        out.append(f"<text x={PAD - 4} y={y + 4:.1f} font-size=11 text-anchor=end>{tick * y_max:.2g}</text>")
    span = edges[-1] - edges[0]
    for frac, anchor in ((0.0, "start"), (0.5, "middle"), (1.0, "end")):
        x = PAD + frac * (WIDTH - PAD - 8)
        label = "now" if frac == 1.0 else _ago(span * (1 - frac))
        out.append(f"<text x={x:.1f} y={HEIGHT - 8} font-size=11 text-anchor={anchor}>{label}</text>")
    out.append(f"<text x={PAD + 6} y=22 font-size=11 fill='#555'>{_e(y_label)}</text>")
    return "".join(out)


def _ago(seconds: float) -> str:
    return f"-{seconds / 3600:.3g} h" if seconds >= 3600 else f"-{seconds / 60:.3g} min"


def _x(edges: Sequence[float], bucket: int) -> float:
    return PAD + (bucket + 0.5) / (len(edges) - 1) * (WIDTH - PAD - 8)


def _y(value: float, y_max: float) -> float:
    return 8 + (1 - value / y_max) * (HEIGHT - PAD - 8)


def _series(name: str, index: int, points: Sequence[tuple[int, float]], edges: Sequence[float], y_max: float,
            kind: str) -> str:
    coords = [(_x(edges, b), _y(v, y_max)) for b, v in points]
    line = (f"<polyline fill=none stroke='{_color(index)}' stroke-width=2 points='"
            + " ".join(f"{x:.1f},{y:.1f}" for x, y in coords) + "'/>") if len(coords) > 1 else ""
    dots = "".join(f"<circle class='point' data-chart='{kind}' data-series='{_e(name)}' data-bucket={b} "
                   f"data-value='{v:.6g}' cx={x:.1f} cy={y:.1f} r=3 fill='{_color(index)}'/>"
                   for (b, v), (x, y) in zip(points, coords))
    return line + dots


def _traffic_chart(data: Mapping[str, Any]) -> str:
    edges, parts = data["edges"], []
    for i, name in enumerate(data["variants"]):
        t = data["traffic"][name]
        steps = " ".join(f"{PAD + (b + k) / (len(edges) - 1) * (WIDTH - PAD - 8):.1f},{_y(w, 1.0):.1f}"
                         for b, w in enumerate(t["weight_share"]) for k in (0, 1))
        parts.append(f"<polyline class='weight' data-series='{_e(name)}' fill=none points='{steps}' "
                     f"stroke='{_color(i)}' stroke-dasharray='6 4'/>")
        points = [(b, s) for b, s in enumerate(t["share"]) if s is not None]
        parts.append(_series(name, i, points, edges, 1.0, "traffic"))
    return (f"<svg class=chart data-chart=traffic viewBox='0 0 {WIDTH} {HEIGHT}' role=img "
            f"aria-label='traffic share per variant'>{_axes(edges, 1.0, 'share (dashed: weight)')}{''.join(parts)}</svg>"
            + _legend(data["variants"]))


def _accuracy_chart(data: Mapping[str, Any]) -> str:
    edges, parts = data["edges"], []
    for i, name in enumerate(data["variants"]):
        points = [(b, p) for b, p in enumerate(data["accuracy"][name]["points"]) if p is not None]
        for b, p in points:
            x = _x(edges, b)
            parts.append(f"<line class=interval x1={x:.1f} x2={x:.1f} y1={_y(p['low'], 1):.1f} y2={_y(p['high'], 1):.1f} "
                         f"stroke='{_color(i)}' stroke-opacity='.4' stroke-width='4'/>")
        parts.append(_series(name, i, [(b, p["value"]) for b, p in points], edges, 1.0, "accuracy"))
    if not parts or all("circle" not in p for p in parts):
        parts.append(f"<text x={WIDTH / 2} y={HEIGHT / 2} text-anchor=middle fill='#888'>no feedback yet</text>")
    return (f"<svg class=chart data-chart=accuracy viewBox='0 0 {WIDTH} {HEIGHT}' role=img aria-label='accuracy per "
            f"variant'>{_axes(edges, 1.0, 'accuracy')}{''.join(parts)}</svg>" + _legend(data["variants"]))


def _calibration_chart(data: Mapping[str, Any]) -> str:
    """Per variant and time bucket, the gap between confidence and accuracy over its labelled answers."""
    edges, series = data["edges"], {}
    for name in data["variants"]:
        series[name] = [(b, e) for b, e in enumerate(data["accuracy"][name]["calibration_error"]) if e is not None]
    values = [e for points in series.values() for _, e in points]
    y_max = max([CALIBRATION_AXIS_MIN, *values])
    parts = [_series(name, i, series[name], edges, y_max, "calibration") for i, name in enumerate(data["variants"])]
    if not values:
        parts.append(f"<text x={WIDTH / 2} y={HEIGHT / 2} text-anchor=middle fill='#888'>no feedback yet</text>")
    return (f"<svg class=chart data-chart=calibration viewBox='0 0 {WIDTH} {HEIGHT}' role=img aria-label='expected "
            f"calibration error per variant'>{_axes(edges, y_max, 'ECE')}{''.join(parts)}</svg>"
            + _legend(data["variants"]))


def _fmt(value: Any, digits: str = ".3g") -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, digits)


def _summary(data: Mapping[str, Any]) -> str:
    verdicts: dict[str, str] = {}
    for d in data["decisions"]:
        verdicts.setdefault(d["candidate"], d["verdict"])
    checked = data["latest_drift"] or {}
    rows = []
    for name in data["variants"]:
        acc = data["accuracy"][name]["overall"]
        latest = data["accuracy"][name]["latest"]
        drifting = [_feature(f) for f in (checked.get("variants", {}).get(name) or {}).get("drifting", [])]
        rows.append(f"<tr><td>{_e(name)}</td><td>{_fmt(data['weights'][name], 'g')}</td>"
                    f"<td>{sum(data['traffic'][name]['rows'])}</td>"
                    f"<td>{_fmt(acc and acc['value'])} ({acc['n'] if acc else 0} labels)</td>"
                    f"<td>{_fmt(latest['accuracy'] and latest['accuracy']['value'])} / "
                    f"{_fmt(latest['calibration_error'], '.2f')} ({latest['labels']})</td>"
                    f"<td>{_e(verdicts.get(name, '–'))}</td>"
                    f"<td class='{'drift' if drifting else ''}'>{_e(', '.join(drifting) or 'none')}</td></tr>")
    return ("<table><tr><th>variant</th><th>weight</th><th>rows</th><th>accuracy</th>"
            "<th title='accuracy and expected calibration error over the newest labels'>newest labels: "
            "accuracy / ECE</th><th>verdict</th>"
            f"<th>drifting</th></tr>{''.join(rows)}</table>")


def _latency_table(data: Mapping[str, Any]) -> str:
    rows = []
    for name in data["variants"]:
        lat, labels = data["latency_ms"][name], data["labels"].get(name, {})
        rows.append(f"<tr><td>{_e(name)}</td><td>{_fmt(lat['p50'])}</td><td>{_fmt(lat['p95'])}</td>"
                    f"<td>{labels.get('labelled', 0)} / {labels.get('served', 0)}</td>"
                    f"<td>{_fmt(labels.get('median_label_delay_s'))}</td></tr>")
    shadow = "".join(f"<tr><td>shadow {_e(v)}</td><td colspan=4>agrees on {s['agreed']} of {s['compared']} "
                     f"({_fmt(s['agreed'] / s['compared'] if s['compared'] else None)})</td></tr>"
                     for v, s in data["shadow"].items())
    return ("<table><tr><th>variant</th><th>p50 ms</th><th>p95 ms</th><th>labelled / served</th>"
            f"<th>median label delay s</th></tr>{''.join(rows)}{shadow}</table>")


def _heatmap(data: Mapping[str, Any]) -> str:
    """Rows: variant and feature; columns: drift checks, oldest first; colour: PSI; a dot: drift flagged."""
    cells = data["drift"]
    if not cells:
        return "<p class=muted>no drift check yet</p>"
    times = sorted({c["at"] for c in cells})
    keys = list(dict.fromkeys((c["variant"], c["feature"]) for c in cells))
    label_w, cell_h = 220, 16
    cell_w = max((WIDTH - label_w) / len(times), 2)
    height = cell_h * len(keys) + 4
    parts = [f"<text x=0 y={r * cell_h + 12} font-size=11>{_e(v)}: {_e(_feature(f))}</text>"
             for r, (v, f) in enumerate(keys)]
    column = {t: i for i, t in enumerate(times)}
    row = {k: i for i, k in enumerate(keys)}
    for c in cells:
        x, y = label_w + column[c["at"]] * cell_w, row[(c["variant"], c["feature"])] * cell_h
        psi = c["psi"] or 0.0
        parts.append(f"<rect class=cell data-variant='{_e(c['variant'])}' data-feature='{_e(c['feature'])}' "
                     f"data-psi='{psi:.6g}' data-drift='{str(c['drift']).lower()}' x={x:.1f} y={y} "
                     f"width={cell_w:.1f} height={cell_h - 2} fill='rgba(214,39,40,{min(psi / PSI_SCALE, 1):.3f})' "
                     f"stroke='{'#000' if c['drift'] else '#eee'}'><title>{_e(c['feature'])}: PSI {psi:.3f}, p "
                     f"{_fmt(c['p_adjusted'])}</title></rect>")
    return (f"<svg class=chart data-chart=drift viewBox='0 0 {WIDTH} {height}' role=img aria-label='drift per feature'>"
            f"{''.join(parts)}</svg><p class=muted>colour: PSI (full at {PSI_SCALE}); black border: drift flagged</p>")


def _feature(name: str) -> str:
    return {PREDICTIONS: "predicted classes", CONFIDENCE: "confidence"}.get(name, name)


def _decision(decision: Mapping[str, Any]) -> str:
    """Each candidate's verdict against the control, with the difference and its always-valid interval."""
    if "error" in decision:
        return f"<p class=warn>{_e(decision['error'])}</p>"
    rows = "".join(
        f"<tr><td>{_e(c['variant'])}</td><td>{_e(c['verdict'])}</td><td>{_fmt(c['difference'])} "
        f"[{_fmt(c['interval'][0])}, {_fmt(c['interval'][1])}]</td><td>{_e(c['reason'])}</td></tr>"
        for c in decision["candidates"])
    return (f"<p class=muted>control {_e(decision['control'])}, metric {_e(decision['metric'])}, margin "
            f"{_fmt(decision['margin'], 'g')}</p><table><tr><th>candidate</th><th>verdict</th><th>difference "
            f"[interval]</th><th>reason</th></tr>{rows}</table>")


def _rollout(summary: Mapping[str, Any]) -> str:
    """The rollout as ``GET /experiments/{model}/rollout`` shows it (``RolloutController.summary``): state,
    step and share, what the next step still needs, the controller's lease, the reason, the steps taken."""
    if not summary:
        return "<p class=muted data-rollout-state=none>no rollout</p>"
    r = summary["rollout"]
    if "error" in r:
        return f"<p class=muted data-rollout-state=unavailable>rollout unavailable: {_e(r['error'])}</p>"
    holder = r["controller"]
    lease = (f"{_e(holder['holder'])} (lease until {_when(holder['expires_at'])})" if holder else "none yet")
    steps = " &rarr; ".join(f"<span class='{'drift' if i == r['step'] else ''}'>{s:g}%</span>"
                            for i, s in enumerate(r["steps"]))
    verdict = r.get("decision")
    facts = [
        ("state", f"<strong>{_e(r['state'])}</strong>"),
        ("candidate", f"{_e(r['candidate'])} against {_e(r['control'])}"),
        ("step", f"{r['step'] + 1} of {len(r['steps'])} ({r['step_share']:g}%): {steps}"),
        ("share now", f"{r['share']:.3g}% of routed traffic"),
        ("at this step", f"{r['labels']} labels in {r['seconds']:.0f} s"),
        ("next step needs", _e("; ".join(r["next"])) if r["next"] else "nothing (the rollout is over)"
         if r["next"] is None else "nothing: it moves at the controller's next round"),
        ("decision", f"{_e(verdict['verdict'])}: {_e(verdict['reason'])}" if verdict else "–"),
        ("controller", lease),
        ("reason", _e(r["reason"])),
        ("started", _when(r["started_at"])),
    ]
    table = "<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts) + "</table>"
    history = "".join(f"<tr class=rollout-step><td>{_when(h['at'])}</td><td>{_e(h['new_weights'])}</td>"
                      f"<td>{_e(h['reason'])}</td></tr>" for h in r["history"])
    return (f"<div data-rollout-state='{_e(r['state'])}' data-share='{r['share']:.6g}' data-step={r['step']} "
            f"data-candidate='{_e(r['candidate'])}'>{table}<h2>Steps taken</h2><table><tr><th>when</th>"
            f"<th>new weights</th><th>reason</th></tr>{history}</table></div>")


def _decisions(data: Mapping[str, Any]) -> str:
    if not data["decisions"]:
        return "<p class=muted>no verdict recorded yet</p>"
    return "<table><tr><th>when</th><th>candidate</th><th>verdict</th></tr>" + "".join(
        f"<tr><td>{_when(d['at'])}</td><td>{_e(d['candidate'])}</td><td>{_e(d['verdict'])}</td></tr>"
        for d in data["decisions"]) + "</table>"


def _history(data: Mapping[str, Any]) -> str:
    if not data["history"]:
        return "<p class=muted>weights unchanged since the configuration</p>"
    return "<table><tr><th>when</th><th>source</th><th>new weights</th><th>reason</th></tr>" + "".join(
        f"<tr><td>{_when(h['at'])}</td><td>{_e(h['source'])}</td><td>{_e(h['new_weights'])}</td>"
        f"<td>{_e(h['reason'])}</td></tr>" for h in data["history"]) + "</table>"


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))
