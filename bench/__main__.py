"""Run every benchmark in one go and write ``bench/results/<date>/`` (report.md, PNG plots, JSON).

``python -m bench`` takes over an hour (every peer, every scenario); ``--smoke`` runs every step for a few seconds.
"""

from __future__ import annotations

import argparse
import re
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from bench import interleaved, loadgen, peer_servers, plots, report, runtime, scenarios, spike
from bench import memory as runtime_memory
from common.logs import setup_logging

ROOT = Path(__file__).resolve().parent.parent
RUNS = 3
"""Closed-loop runs per scenario by default: the report shows the median and all of them."""
NO_PEERS = "none"  # --peers none: this server alone
LOG_ROUNDS = 10
"""Rounds of the log's interleaved step (one with ``--smoke``): its ratio is their median."""
SMOKE_SPIKE = (50.0, 2.0, 2.0)
"""The spike step's base rate, factor and seconds with ``--smoke``."""


def server_counts(url: str, path: str) -> dict[str, float]:
    """Counters to difference around a run: the batch-size histograms' sums and counts, and
    BentoML's answers on ``path`` by status code (the server counts them, wrk need not), or for a
    gRPC method the rows its endpoint answered (OK) or failed."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, float] = defaultdict(float)
    grpc_endpoint = scenarios.GRPC_ENDPOINTS.get(path.removeprefix(scenarios.GRPC))
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if grpc_endpoint and sample.name == "bundle_requests_total" and sample.labels["endpoint"] == grpc_endpoint:
                outcome = sample.labels["outcome"]
                out[f"status {loadgen.GRPC_OK if outcome == 'ok' else outcome}"] += sample.value
            if family.name in ("bentoml_service_adaptive_batch_size", "bundle_batch_rows") and \
                    sample.name.endswith(("_sum", "_count")):
                out[sample.name] += sample.value
            elif sample.name == "bentoml_service_request_total" and sample.labels.get("endpoint") == path:
                out[f"status {sample.labels['http_response_code']}"] += sample.value
            elif sample.name == "bundle_cache_total":
                out[f"cache {sample.labels['outcome']}"] += sample.value
    return dict(out)


def run_delta(before: dict[str, float], after: dict[str, float]) -> tuple[dict[str, int], dict[str, float]]:
    """Answers by status code, and mean batch size per histogram (and the prediction cache's hit rate),
    during one run."""
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    statuses = {k.split()[1]: int(v) for k, v in delta.items() if k.startswith("status ") and v}
    means = {name: delta[f"{name}_sum"] / delta[f"{name}_count"]
             for name in ("bentoml_service_adaptive_batch_size", "bundle_batch_rows")
             if delta.get(f"{name}_count")}
    looked_up = sum(v for k, v in delta.items() if k.startswith("cache "))
    if looked_up:
        means["cache_hit_rate"] = delta.get("cache hit", 0.0) / looked_up
    return statuses, means


def profile(pid: int, seconds: float, destination: Path) -> subprocess.Popen:
    """Sample one worker with py-spy while the load runs, so a miss says where the time goes."""
    command = [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid), "--duration",
               str(int(seconds)), "--format", "raw", "--nonblocking", "--output", str(destination)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_server(name: str, group: list[scenarios.Scenario], bodies: dict, seconds: float, open_s: float,
               warm_s: float, repeats: int, workdir: Path, store: Path, profile_name: str | None) -> tuple[list[loadgen.LoadResult], dict]:
    folder = workdir / name
    folder.mkdir()
    peer = name in peer_servers.PEERS
    if peer:
        server = peer_servers.start(name, folder)
    else:
        target, overrides = scenarios.SERVERS[name]
        server = scenarios.start_server(target, overrides, store, folder)
    # Answers by status code and batch sizes come from BentoML's metrics; a peer's from the load generator.
    counts = (lambda url, path: {}) if peer else server_counts
    results = []
    try:
        for scenario in group:  # BentoML's batcher trains its latency model on the first batches
            if not scenario.path.startswith(scenarios.GRPC):
                loadgen.open_loop("warm-up", server.url + scenario.path, bodies[scenario.body], 100, warm_s)
        memory = server.memory()
        for scenario in group:
            body = bodies[scenario.body]

            def closed_run() -> loadgen.LoadResult:
                if scenario.path.startswith(scenarios.GRPC):
                    method = scenario.path.removeprefix(scenarios.GRPC)
                    return loadgen.grpc_closed_loop(scenario.name, f"http://{server.grpc_target}{method}", body,
                                                    scenario.concurrency or 1, seconds, folder)
                return loadgen.closed_loop(scenario.name, server.url + scenario.path, body,
                                           scenario.concurrency or 1, seconds, folder)

            before = counts(server.url, scenario.path)
            workers = server.workers()
            cpu_before = [sum(p.cpu_times()[:2]) for p in workers]
            if scenario.rate:
                result = loadgen.open_loop(scenario.name, server.url + scenario.path, body, scenario.rate, open_s)
                runs = [result.throughput]
            else:
                repeated, splits = [], []
                for _ in range(repeats):
                    run_before = [sum(p.cpu_times()[:2]) for p in workers]
                    repeated.append(closed_run())
                    splits.append(cpu_split([sum(p.cpu_times()[:2]) - b for p, b in zip(workers, run_before)]))
                    server.wait_idle()
                run_splits = [s for _, s in sorted(zip((r.throughput for r in repeated), splits))]
                runs = sorted(r.throughput for r in repeated)
                result = sorted(repeated, key=lambda r: r.throughput)[len(repeated) // 2]  # the median run
            cpu_used = [sum(p.cpu_times()[:2]) - b for p, b in zip(workers, cpu_before)]
            statuses, means = run_delta(before, counts(server.url, scenario.path))
            if scenario.name == profile_name:
                # One more run, not measured: py-spy's sampling takes CPU from the two cores the server
                # runs on (with it, the headline measured 3-4% lower: docs/performance.md, "Why the bench read 0.90x").
                spy = profile(workers[0].pid, seconds, workdir / "profile.txt")
                closed_run()
                spy.wait(30)
                server.wait_idle()
            if result.mode == "closed" and not peer:  # the server's count by code replaces wrk's 2xx/non-2xx
                if scenario.path.startswith(scenarios.GRPC):
                    # Calls h2load saw answered that the data plane never counted were refused before it
                    # (at least that many: calls the server answered as h2load stopped count only there).
                    refused = sum(r.requests for r in repeated) - sum(statuses.values())
                    if refused > 0:
                        statuses["not OK"] = refused
                result.statuses = {**statuses, **{k: v for k, v in result.statuses.items() if k == "socket_error"}}
            result.extra = {"server": name, "path": scenario.path, "runs_rps": [round(r) for r in runs], "peer": peer,
                            "worker_cpu_split": cpu_split(cpu_used), **means}
            if not scenario.rate:  # each run's split beside its req/s: an uneven one explains a slow run
                result.extra["runs_worker_cpu_split"] = run_splits
            results.append(result)
            server.wait_idle()
    finally:
        server.stop()
    return results, memory


def cpu_split(used: list[float]) -> list[float]:
    """Each worker's share of the CPU the workers used."""
    return [round(c / max(sum(used), 1e-9), 2) for c in used]


def scenario_pattern(text: str) -> re.Pattern[str]:
    """``--scenarios``: a regular expression, or argparse's error naming what is wrong with it."""
    try:
        return re.compile(text)
    except re.error as err:
        raise argparse.ArgumentTypeError(f"not a regular expression ({err}): e.g. '^predict wine c=32$'") from None


def chosen_peers(requested: list[str] | None, smoke: bool) -> list[str]:
    """The peers to run: ``--peers`` alone means all of them (it once meant none, and a user asking for
    peers got a report without them), ``--peers none`` none; left out, all but with ``--smoke``."""
    if requested is None:
        return [] if smoke else sorted(peer_servers.PEERS)
    return [] if NO_PEERS in requested else sorted(set(requested) or peer_servers.PEERS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="every step for a few seconds")
    parser.add_argument("--out", type=Path, help="default: bench/results/<date>")
    parser.add_argument("--peers", nargs="*", choices=[*sorted(peer_servers.PEERS), NO_PEERS], metavar="PEER",
                        help=f"peer servers to run beside this one (default, or --peers alone: all of "
                             f"{sorted(peer_servers.PEERS)}; none with --smoke or --peers {NO_PEERS}); "
                             "their venvs are made on first use in .venv-peers/")
    parser.add_argument("--runs", type=int, metavar="N",
                        help="closed-loop runs per scenario, the median reported (default 3, 1 with --smoke)")
    parser.add_argument("--scenarios", type=scenario_pattern, metavar="REGEX",
                        help="run only the scenarios whose name matches (e.g. '^(predict|kserve) wine c=32$'; "
                             f"{scenarios.LOG_PAIR!r} names the log's interleaved step)")
    args = parser.parse_args(argv)
    peers = chosen_peers(args.peers, args.smoke)
    setup_logging()
    out = args.out or ROOT / "bench" / "results" / datetime.date.today().isoformat()
    out.mkdir(parents=True, exist_ok=True)
    store = Path(os.environ.get("BENTOML_HOME", ROOT / ".bentoml"))
    seconds, open_s = (2.0, 2.0) if args.smoke else (6.0, 30.0)
    loadgen.require_wrk()

    runtimes = runtime.run(budget_s=0.02 if args.smoke else 0.3, min_calls=3 if args.smoke else 20)
    memory_steps = runtime_memory.run()
    for name in tqdm(peers, desc="peer venvs", unit="peer"):
        peer_servers.ensure_venv(name)
    plan = scenarios.plan(args.smoke) + scenarios.peer_scenarios(peers, args.smoke)
    if args.scenarios:
        plan = [scenario for scenario in plan if args.scenarios.search(scenario.name)]
    bodies = scenarios.bodies(peers)
    groups: dict[str, list[scenarios.Scenario]] = defaultdict(list)
    for scenario in plan:
        groups[scenario.server].append(scenario)
    results: list[loadgen.LoadResult] = []
    memory: dict[str, dict] = {}
    profile_name = None if args.smoke else "predict wine c=32"
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for name, group in tqdm(groups.items(), desc="servers", unit="server"):
            found, memory[name] = run_server(name, group, bodies, seconds, open_s, 1.0 if args.smoke else 3.0,
                                             args.runs or (1 if args.smoke else RUNS), Path(tmp), store, profile_name)
            results += found
        hot = report.profile_summary(Path(tmp) / "profile.txt")
        spike_run = None
        if not args.scenarios or args.scenarios.search(scenarios.SPIKE):
            folder = Path(tmp) / "spike"
            folder.mkdir()
            server = scenarios.start_server("service:Bundle", {}, store, folder)
            try:
                spike_run = spike.run(server.url, *(SMOKE_SPIKE if args.smoke else (spike.RATE, spike.FACTOR,
                                                                                      spike.SPIKE_S)))
            finally:
                server.stop()
    log_runs = []
    if not args.scenarios or args.scenarios.search(scenarios.LOG_PAIR):
        log_runs = interleaved.run(scenarios.LOG_CONFIGURATIONS, 1 if args.smoke else LOG_ROUNDS,
                                   scenarios.main_concurrency(args.smoke), seconds, "/predict",
                                   bodies["predict-wine"], store)

    (out / "results.json").write_text(json.dumps({
        "runtimes": [dataclasses.asdict(r) for r in runtimes],
        "http": [dataclasses.asdict(r) for r in results], "log_interleaved": log_runs,
        "spike": dataclasses.asdict(spike_run) if spike_run else None,
        "memory": memory,
        "runtime_memory": [dataclasses.asdict(step) for step in memory_steps]}, indent=1))
    if runtimes:  # none when --scenarios left the runtime step out, or the store holds no model
        plots.runtime_bars(runtimes, out / "runtime_latency.png")
    plots.latency_cdf(results, out / "latency_cdf.png")
    plots.throughput_sweep(results, out / "throughput_vs_concurrency.png")
    text = report.markdown(runtimes, results, log_runs, spike_run, memory, memory_steps, hot, smoke=args.smoke)
    (out / "report.md").write_text(text)
    print(report.summary(results, log_runs, spike_run, memory))
    print(f"\nfull report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
