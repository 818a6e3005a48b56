-- Closed-loop load for wrk: the body comes from a file (so JSON and multipart are sent byte for
-- byte), and done() prints one JSON line with counts by status and latency percentiles.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local f = assert(io.open(args[1], "rb"))
  wrk.method = "POST"
  wrk.body = f:read("*all")
  f:close()
  wrk.headers["Content-Type"] = args[2]
  statuses = {}
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      counts[tostring(status)] = (counts[tostring(status)] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(counts) do table.insert(parts, string.format('"%s": %d', status, n)) end
  local pct = {}
  for _, p in ipairs({1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 97, 99, 99.5, 99.9}) do
    table.insert(pct, string.format('[%g, %.3f]', p, latency:percentile(p) / 1000.0))
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_s": %.3f, "statuses": {%s}, "socket_errors": %d, '
    .. '"timeouts": %d, "latency_ms": [%s]}\n',
    summary.requests, summary.duration / 1e6, table.concat(parts, ", "),
    e.connect + e.read + e.write, e.timeout, table.concat(pct, ", ")))
end
