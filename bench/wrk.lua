-- Closed-loop load for wrk: the body comes from a file (so JSON and multipart are sent byte for
-- byte), and done() prints one JSON line with counts and latency percentiles. There is no
-- per-response callback: it would cost wrk CPU that the server needs. Answers by status code come
-- from the server's own metrics (bentoml_service_request_total).

function init(args)
  local f = assert(io.open(args[1], "rb"))
  wrk.method = "POST"
  wrk.body = f:read("*all")
  f:close()
  wrk.headers["Content-Type"] = args[2]
end

function done(summary, latency, requests)
  local pct = {}
  for _, p in ipairs({1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 97, 99, 99.5, 99.9}) do
    table.insert(pct, string.format('[%g, %.3f]', p, latency:percentile(p) / 1000.0))
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_s": %.3f, "non_2xx": %d, "socket_errors": %d, '
    .. '"timeouts": %d, "latency_ms": [%s]}\n',
    summary.requests, summary.duration / 1e6, e.status, e.connect + e.read + e.write, e.timeout,
    table.concat(pct, ", ")))
end
