-- wrk script for `dlserve bench --soak`: replays prepared requests of any route, method
-- and body type, and counts the answers by status class.
--
-- Usage: wrk -t1 -c64 -d60s -s wrk_mixed.lua http://host:port -- requests.bin
-- requests.bin holds records "<path>\n<content-type>\n<body length>\n<body bytes>".

local requests = {}
local next_index = 1
-- Each wrk thread has a Lua state of its own: response() counts in the thread's `counts`,
-- and done(), in the main state, adds them up through the threads setup() kept.
counts = {["2"] = 0, ["3"] = 0, ["4"] = 0, ["5"] = 0}
local threads = {}

function setup(thread)
  threads[#threads + 1] = thread
end

function init(args)
  local file = assert(io.open(args[1], "rb"), "cannot open " .. tostring(args[1]))
  local data = file:read("*a")
  file:close()
  local at = 1
  while at <= #data do
    local path_end = data:find("\n", at, true)
    local type_end = data:find("\n", path_end + 1, true)
    local len_end = data:find("\n", type_end + 1, true)
    local path = data:sub(at, path_end - 1)
    local kind = data:sub(path_end + 1, type_end - 1)
    local length = tonumber(data:sub(type_end + 1, len_end - 1))
    local body = data:sub(len_end + 1, len_end + length)
    requests[#requests + 1] = wrk.format("POST", path, {["Content-Type"] = kind}, body)
    at = len_end + length + 1
  end
  assert(#requests > 0, "no requests in " .. args[1])
  math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 100000)
  next_index = math.random(#requests)
end

function request()
  local req = requests[next_index]
  next_index = next_index % #requests + 1
  return req
end

function response(status, headers, body)
  local class = tostring(status):sub(1, 1)
  counts[class] = (counts[class] or 0) + 1
end

function done(summary, latency, requests_done)
  local total = {["2"] = 0, ["4"] = 0, ["5"] = 0}
  for _, thread in ipairs(threads) do
    local c = thread:get("counts")
    for class, n in pairs(total) do
      total[class] = n + (c[class] or 0)
    end
  end
  local e = summary.errors
  io.write(string.format(
    'DLSERVE_RESULT {"requests": %d, "duration_us": %d, "non_2xx": %d, "socket_errors": %d, ' ..
    '"timeouts": %d, "p50_us": %d, "p95_us": %d, "p99_us": %d, "mean_us": %.1f, "max_us": %d, ' ..
    '"status_2xx": %d, "status_4xx": %d, "status_5xx": %d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.mean,
    latency.max, total["2"], total["4"], total["5"]))
end
