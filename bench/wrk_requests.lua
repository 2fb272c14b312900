-- wrk script for `dlserve bench`: replays prepared POST requests and prints a JSON summary.
--
-- Usage: wrk -t1 -c64 -d60s -s wrk_requests.lua http://host:port -- requests.tsv
-- requests.tsv holds one request per line, "<path>\t<JSON body>". Each connection starts
-- at a different line and cycles through the file, so a mixed file gives a mixed load.

local requests = {}
local next_index = 1

function init(args)
  local file = assert(io.open(args[1], "r"), "cannot open " .. tostring(args[1]))
  for line in file:lines() do
    local tab = line:find("\t", 1, true)
    if tab then
      requests[#requests + 1] = wrk.format(
        "POST", line:sub(1, tab - 1),
        {["Content-Type"] = "application/json"}, line:sub(tab + 1))
    end
  end
  file:close()
  assert(#requests > 0, "no requests in " .. args[1])
  math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 100000)
  next_index = math.random(#requests)
end

function request()
  local req = requests[next_index]
  next_index = next_index % #requests + 1
  return req
end

function done(summary, latency, requests_done)
  local e = summary.errors
  io.write(string.format(
    'DLSERVE_RESULT {"requests": %d, "duration_us": %d, "non_2xx": %d, "socket_errors": %d, ' ..
    '"timeouts": %d, "p50_us": %d, "p95_us": %d, "p99_us": %d, "mean_us": %.1f, "max_us": %d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.mean,
    latency.max))
end
