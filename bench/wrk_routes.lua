-- wrk script used by bench/run for every target and scenario.
--
--   wrk ... -s bench/wrk_routes.lua http://127.0.0.1:PORT -- MODE REST METHOD BODY_BYTES USERS SANDBOXES
--
--   MODE       "routed": cycle through /u{0..USERS-1}/sb{0..SANDBOXES-1}{REST} (1,000 routes by default),
--              "direct": send REST itself (the backend-direct upper bound), cycled the same way so
--              wrk does the same work per request for every target.
--   REST       path the backend serves (/small, /1m, /post)
--   METHOD     GET or POST
--   BODY_BYTES request body size for POST (0: none)
--
-- Requests are formatted once in init() and then handed out round-robin by request(), so
-- consecutive requests hit different users and sandboxes. No response() callback is defined
-- (it would make wrk parse every response into Lua tables and slow the load generator down);
-- status codes are counted by wrk itself ("Non-2xx or 3xx responses" / summary.errors.status).
-- done() prints one machine-readable line (BENCHJSON {...}) next to wrk's own text report.

local reqs = {}
local n = 0
local i = 0

function init(args)
    local mode = args[1] or "routed"
    local rest = args[2] or "/small"
    local method = args[3] or "GET"
    local body_bytes = tonumber(args[4] or "0") or 0
    local users = tonumber(args[5] or "10") or 10
    local sandboxes = tonumber(args[6] or "100") or 100
    local body = nil
    local headers = {}
    if body_bytes > 0 then
        body = string.rep("x", body_bytes)
        headers["Content-Type"] = "application/octet-stream"
    end
    -- sandbox-major order: u0/sb0, u1/sb0, ..., u9/sb0, u0/sb1, ...
    for s = 0, sandboxes - 1 do
        for u = 0, users - 1 do
            local path
            if mode == "direct" then
                path = rest
            else
                path = string.format("/u%d/sb%d%s", u, s, rest)
            end
            n = n + 1
            reqs[n] = wrk.format(method, path, headers, body)
        end
    end
end

function request()
    i = i + 1
    if i > n then
        i = 1
    end
    return reqs[i]
end

function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,"err_connect":%d,"err_read":%d,'
            .. '"err_write":%d,"err_status":%d,"err_timeout":%d,"lat_mean_us":%.2f,"lat_max_us":%d,'
            .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d}\n',
        summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
        e.timeout, latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
        latency:percentile(99), latency:percentile(99.9)))
end
