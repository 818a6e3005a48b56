"""grpc.aio (old tree) against the h2 transport (new tree): per round, h2load gRPC and wrk /predict on
each server, rows per runtime call from bundle_batch_rows, worker CPU per request."""
import json, os, shutil, statistics, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, "/work/main")
import httpx
from prometheus_client.parser import text_string_to_metric_families
from bench import loadgen, scenarios
from harness.server import ServerProcess, isolated_home
ROUNDS, SECONDS = int(sys.argv[1]), float(sys.argv[2])
trees = {"grpc.aio": Path("/tmp/wt-old"), "h2": Path("/work/main")}
store = Path(os.environ["BENTOML_HOME"])
bodies = scenarios.bodies()
servers = {}
for name, tree in trees.items():
    folder = Path(tempfile.mkdtemp(prefix=f"oldnew-{name}-"))
    shutil.copy(tree / "config.yaml", folder / "config.yaml")
    env = {**os.environ, "PYTHONPATH": str(tree), "BENTOML_HOME": str(isolated_home(store, folder)),
           "BUNDLE_CONFIG": str(folder / "config.yaml")}
    servers[name] = (ServerProcess("service:Bundle", tree, env, folder), folder)
def rows_per_call(url):
    s = c = 0
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for smp in fam.samples:
            if smp.name == "bundle_batch_rows_sum": s += smp.value
            if smp.name == "bundle_batch_rows_count": c += smp.value
    return s, c
def cpu(server): return sum(sum(w.cpu_times()[:2]) for w in server.workers())
runs = []
try:
    time.sleep(3)
    for name, (server, folder) in servers.items():
        loadgen.grpc_closed_loop("warm", f"http://{server.grpc_target}/inference.GRPCInferenceService/ModelInfer", bodies["grpc-oip-wine"], 32, 3, folder)
    order = list(servers)
    for rnd in range(ROUNDS):
        for name in (order if rnd % 2 == 0 else order[::-1]):
            server, folder = servers[name]
            for proto in ("grpc", "rest"):
                s0, c0 = rows_per_call(server.url); cpu0 = cpu(server)
                if proto == "grpc":
                    r = loadgen.grpc_closed_loop("g", f"http://{server.grpc_target}/inference.GRPCInferenceService/ModelInfer", bodies["grpc-oip-wine"], 32, SECONDS, folder)
                else:
                    r = loadgen.closed_loop("p", server.url + "/predict", bodies["predict-wine"], 32, SECONDS, folder)
                used = cpu(server) - cpu0; s1, c1 = rows_per_call(server.url)
                rec = {"round": rnd, "server": name, "proto": proto, "req_s": round(r.throughput), "p50": r.latency_ms[50], "p99": r.latency_ms[99],
                       "rows_per_call": round((s1 - s0) / max(c1 - c0, 1), 2), "cpu_us": round(used / max(r.requests, 1) * 1e6)}
                runs.append(rec); print(json.dumps(rec), flush=True)
finally:
    for server, _ in servers.values(): server.stop()
out = Path(sys.argv[3]); out.mkdir(parents=True, exist_ok=True)
(out / "runs.json").write_text(json.dumps(runs, indent=1))
print("\n| server | protocol | median req/s | gRPC over /predict (median of rounds) | rows per runtime call | worker CPU us a request | p50 / p99 ms |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for name in servers:
    for proto in ("grpc", "rest"):
        mine = [r for r in runs if r["server"] == name and r["proto"] == proto]
        ratio = ""
        if proto == "grpc":
            ratios = [g["req_s"] / p["req_s"] for g in mine for p in runs if p["server"] == name and p["proto"] == "rest" and p["round"] == g["round"]]
            ratio = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
        med = lambda k: statistics.median(r[k] for r in mine)
        print(f"| {name} | {proto} | {med('req_s'):.0f} | {ratio} | {med('rows_per_call'):.2f} | {med('cpu_us'):.0f} | {med('p50'):.1f} / {med('p99'):.1f} |")
