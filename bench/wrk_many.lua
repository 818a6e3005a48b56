-- Closed-loop load over many bodies: the file holds one body a line, drawn beforehand (rows repeated
-- Zipf-like, or all distinct: bench/scenarios.py), so wrk only sends them in turn. The rest, the
-- done() report included, is wrk.lua's.
dofile(debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") .. "/wrk.lua")

local requests, sent = {}, 0

function init(args)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = args[2]
  for line in io.lines(args[1]) do
    requests[#requests + 1] = wrk.format(nil, nil, nil, line)
  end
end

function request()
  sent = sent % #requests + 1
  return requests[sent]
end
