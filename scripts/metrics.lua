-- metrics.lua: GET /metrics in the Prometheus text exposition format (version 0.0.4). Served on
-- the main listener, or only on its own listener when metrics_listen is set. Everything comes
-- from counters the runtime keeps in C (per worker, added up here) or from shared dicts, so a
-- scrape costs the same whatever the traffic, and a request costs nothing extra.
--   sandbox_proxy_requests_total{method,code}     requests by method and status class (2xx..)
--   sandbox_proxy_request_duration_seconds        histogram of request durations
--   sandbox_proxy_upstream_connect_seconds        histogram: new connections to sandboxes, from
--                                                 the start of forwarding to connected (retries
--                                                 of a refused connect included; a pooled
--                                                 connection is not a connect)
--   sandbox_proxy_upstream_first_byte_seconds     histogram: forwarded requests, from the start
--                                                 of forwarding to the response head (connect
--                                                 included; wake and routing are not)
--   sandbox_proxy_upstream_connect_errors_total, sandbox_proxy_upstream_timeouts_total
--   sandbox_proxy_ratelimited_total{kind="rate"|"concurrency"|"store"} ("store": refused because
--                                                 the Redis store was unavailable, fallback "closed")
--   sandbox_proxy_ratelimit_allowed_total         requests let through (lags by up to 1 s)
--   sandbox_proxy_ratelimit_store_fallbacks_total  decisions taken without the Redis store
--                                                 (ratelimit.redis: down, timeout, error reply)
--   sandbox_proxy_open_connections, sandbox_proxy_open_tunnels, sandbox_proxy_active_requests
--   sandbox_proxy_routes{ready="true"|"false"}
--   sandbox_proxy_watch_relists_total, sandbox_proxy_watch_seconds_since_event,
--   sandbox_proxy_watch_synced, sandbox_proxy_script_errors_total,
--   sandbox_proxy_parse_errors_total, sandbox_proxy_shared_dict_evictions_total{dict},
--   sandbox_proxy_shared_dict_used_bytes{dict}, sandbox_proxy_accesslog_dropped_total,
--   sandbox_proxy_trace_spans_exported_total, sandbox_proxy_trace_spans_dropped_total,
--   sandbox_proxy_write_batches_total, sandbox_proxy_batched_writes_total (io_uring_writes),
--   sandbox_proxy_lua_memory_bytes (the answering worker's state),
--   process_resident_memory_bytes (the whole process, from /proc/self/status; Linux)
--   wake.lua: sandbox_proxy_wakes_total (PATCHes that woke a sandbox),
--   sandbox_proxy_wake_failures_total (PATCHes refused or unanswered),
--   sandbox_proxy_wake_duration_seconds (histogram: from the request that claimed the wake to
--   Ready, seen by worker 0 of the replica that claimed it), sandbox_proxy_wake_held_requests,
--   sandbox_proxy_idle_suspends_total
local core = require "sp.core"
local routes = require "sp.routes"
local shared = require "sp.shared"
local cjson = require "cjson.safe"

local concat = table.concat
local format = string.format

local sp_dict = assert(shared.dict("sp"))
local M = {}

-- Upper bounds of the wake duration histogram, in seconds (a sandbox's start takes seconds).
M.WAKE_BUCKETS = { 0.5, 1, 2, 5, 10, 20, 30, 60, 120 }

-- Records one wake's duration (wake.lua calls it; one shared dict update per bucket).
function M.observe_wake(seconds)
    for i, le in ipairs(M.WAKE_BUCKETS) do
        if seconds <= le then
            sp_dict:incr("m:wake_le:" .. i, 1, 0)
            break
        end
    end
    sp_dict:incr("m:wake_sum", seconds, 0)
    sp_dict:incr("m:wake_count", 1, 0)
end

-- The process's resident set size in bytes (VmRSS), or nil where /proc is not Linux's.
local function resident_bytes()
    local f = io.open("/proc/self/status", "r")
    if not f then
        return nil
    end
    local text = f:read("*a")
    f:close()
    local kb = text:match("\nVmRSS:%s*(%d+) kB")
    return kb and tonumber(kb) * 1024
end
M.resident_bytes = resident_bytes

-- A label value escaped as the exposition format wants (backslash, quote, newline).
local function label(v)
    return (tostring(v):gsub("[\\\"\n]", { ["\\"] = "\\\\", ['"'] = '\\"', ["\n"] = "\\n" }))
end
M.label = label

local function num(v)
    if v == math.huge then
        return "+Inf"
    end
    if v == math.floor(v) and math.abs(v) < 1e15 then
        return format("%d", v)
    end
    return format("%.6g", v)
end

-- Renders the exposition text.
function M.render()
    local st = core.stats()
    local out = {}
    local function metric(name, kind, help)
        out[#out + 1] = "# HELP " .. name .. " " .. help
        out[#out + 1] = "# TYPE " .. name .. " " .. kind
    end
    local function sample(name, labels, value)
        out[#out + 1] = name .. (labels or "") .. " " .. num(value)
    end

    metric("sandbox_proxy_requests_total", "counter", "Requests by method and status class.")
    for method, classes in pairs(st.by_method) do
        for c = 1, 5 do
            if classes[c] > 0 then
                sample("sandbox_proxy_requests_total", format('{method="%s",code="%dxx"}', method, c),
                    classes[c])
            end
        end
        if classes.none > 0 then
            sample("sandbox_proxy_requests_total", format('{method="%s",code="none"}', method),
                classes.none)
        end
    end

    -- a histogram from the runtime's buckets ({le, n} per bucket, "+Inf" last)
    local function histogram(name, help, buckets, sum)
        metric(name, "histogram", help)
        local cum = 0
        for _, b in ipairs(buckets) do
            cum = cum + b[2]
            local le = b[1] == "+Inf" and "+Inf" or num(b[1])
            sample(name .. "_bucket", format('{le="%s"}', le), cum)
        end
        sample(name .. "_sum", nil, sum)
        sample(name .. "_count", nil, cum)
    end

    histogram("sandbox_proxy_request_duration_seconds",
        "Time from the first request byte to the end of the response.",
        st.latency_buckets, st.latency_sum)
    histogram("sandbox_proxy_upstream_connect_seconds",
        "Time to connect to a sandbox from the start of forwarding (new connections only, "
            .. "refused-connect retries included).",
        st.upstream_connect_buckets, st.upstream_connect_sum)
    histogram("sandbox_proxy_upstream_first_byte_seconds",
        "Time from the start of forwarding to the sandbox's response head (connect included).",
        st.upstream_first_byte_buckets, st.upstream_first_byte_sum)

    metric("sandbox_proxy_upstream_connect_errors_total", "counter",
        "Connections to sandboxes that failed (after retries).")
    sample("sandbox_proxy_upstream_connect_errors_total", nil, st.upstream_connect_errors)
    metric("sandbox_proxy_upstream_timeouts_total", "counter", "Upstream connect and first-byte timeouts.")
    sample("sandbox_proxy_upstream_timeouts_total", nil, st.upstream_timeouts)

    metric("sandbox_proxy_write_batches_total", "counter",
        "io_uring_enter calls that sent the small writes of one loop iteration together "
            .. "(io_uring_writes).")
    sample("sandbox_proxy_write_batches_total", nil, st.write_batches or 0)
    metric("sandbox_proxy_batched_writes_total", "counter",
        "Writes sent in those batches (divided by the batches: writes per kernel entry).")
    sample("sandbox_proxy_batched_writes_total", nil, st.batched_writes or 0)

    metric("sandbox_proxy_ratelimited_total", "counter", "Requests refused by ratelimit.lua.")
    sample("sandbox_proxy_ratelimited_total", '{kind="rate"}', sp_dict:get("m:ratelimited") or 0)
    sample("sandbox_proxy_ratelimited_total", '{kind="concurrency"}',
        sp_dict:get("m:concurrency_limited") or 0)
    sample("sandbox_proxy_ratelimited_total", '{kind="store"}',
        sp_dict:get("m:ratelimit_store_refused") or 0)
    metric("sandbox_proxy_ratelimit_allowed_total", "counter",
        "Requests ratelimit.lua let through (added up once a second per worker).")
    sample("sandbox_proxy_ratelimit_allowed_total", nil, sp_dict:get("m:ratelimit_allowed") or 0)
    metric("sandbox_proxy_ratelimit_store_fallbacks_total", "counter",
        "Rate-limit decisions taken without the Redis store (its fallback decided).")
    sample("sandbox_proxy_ratelimit_store_fallbacks_total", nil,
        sp_dict:get("m:ratelimit_store_fallbacks") or 0)

    metric("sandbox_proxy_open_connections", "gauge", "Open client connections.")
    sample("sandbox_proxy_open_connections", nil, st.open_connections)
    metric("sandbox_proxy_open_tunnels", "gauge", "Open upgraded (WebSocket) tunnels.")
    sample("sandbox_proxy_open_tunnels", nil, st.open_tunnels)
    metric("sandbox_proxy_active_requests", "gauge", "Requests in progress.")
    sample("sandbox_proxy_active_requests", nil, st.active_requests)

    local total, ready = routes.count(), routes.count_ready()
    metric("sandbox_proxy_routes", "gauge", "Routes in the table by ready state.")
    sample("sandbox_proxy_routes", '{ready="true"}', ready)
    sample("sandbox_proxy_routes", '{ready="false"}', total - ready)

    local src = cjson.decode(sp_dict:get("source") or "{}") or {}
    metric("sandbox_proxy_watch_synced", "gauge", "1 once the sandbox source has synced.")
    sample("sandbox_proxy_watch_synced", nil, src.synced and 1 or 0)
    metric("sandbox_proxy_watch_relists_total", "counter", "Full relists of the Kubernetes watch.")
    sample("sandbox_proxy_watch_relists_total", nil, tonumber(src.relists) or 0)
    if type(src.last_event_at) == "number" then
        metric("sandbox_proxy_watch_seconds_since_event", "gauge",
            "Seconds since the last watch event or bookmark.")
        sample("sandbox_proxy_watch_seconds_since_event", nil,
            math.max(0, core.now() - src.last_event_at))
    end

    metric("sandbox_proxy_script_errors_total", "counter", "Script errors (each answered 500 or logged).")
    sample("sandbox_proxy_script_errors_total", nil, st.script_errors)
    metric("sandbox_proxy_parse_errors_total", "counter", "Malformed requests (answered 4xx).")
    sample("sandbox_proxy_parse_errors_total", nil, st.parse_errors)
    metric("sandbox_proxy_accesslog_dropped_total", "counter",
        "Access-log lines dropped because stdout was not keeping up.")
    sample("sandbox_proxy_accesslog_dropped_total", nil, st.accesslog_dropped)
    metric("sandbox_proxy_trace_spans_exported_total", "counter",
        "Spans the OTLP receiver accepted (otlp_endpoint).")
    sample("sandbox_proxy_trace_spans_exported_total", nil, st.trace_spans_exported)
    metric("sandbox_proxy_trace_spans_dropped_total", "counter",
        "Spans dropped: the queue (otlp_queue_size) was full, or an export failed.")
    sample("sandbox_proxy_trace_spans_dropped_total", nil, st.trace_spans_dropped)

    metric("sandbox_proxy_shared_dict_evictions_total", "counter",
        "Entries evicted from shared dicts to make room.")
    local dicts = shared.dicts()
    table.sort(dicts)
    local used = {}
    for _, name in ipairs(dicts) do
        local s = shared.dict(name):stats()
        sample("sandbox_proxy_shared_dict_evictions_total", format('{dict="%s"}', label(name)), s.evictions)
        used[#used + 1] = { name, s.used }
    end
    metric("sandbox_proxy_shared_dict_used_bytes", "gauge", "Bytes used in each shared dict.")
    for _, u in ipairs(used) do
        sample("sandbox_proxy_shared_dict_used_bytes", format('{dict="%s"}', label(u[1])), u[2])
    end
    metric("sandbox_proxy_lua_memory_bytes", "gauge", "Memory of the answering worker's Lua state.")
    sample("sandbox_proxy_lua_memory_bytes", nil, st.lua_memory)
    local rss = resident_bytes()
    if rss then
        metric("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.")
        sample("process_resident_memory_bytes", nil, rss)
    end

    metric("sandbox_proxy_wakes_total", "counter", "Suspended sandboxes woken (PATCHes accepted).")
    sample("sandbox_proxy_wakes_total", nil, sp_dict:get("m:wakes") or 0)
    metric("sandbox_proxy_wake_failures_total", "counter",
        "Wake PATCHes refused or unanswered (each answered 503).")
    sample("sandbox_proxy_wake_failures_total", nil, sp_dict:get("m:wake_failures") or 0)
    metric("sandbox_proxy_wake_duration_seconds", "histogram",
        "Time from the request that claimed a wake to the sandbox being ready.")
    local wcum = 0
    for i, le in ipairs(M.WAKE_BUCKETS) do
        wcum = wcum + (sp_dict:get("m:wake_le:" .. i) or 0)
        sample("sandbox_proxy_wake_duration_seconds_bucket", format('{le="%s"}', num(le)), wcum)
    end
    local wcount = sp_dict:get("m:wake_count") or 0
    sample("sandbox_proxy_wake_duration_seconds_bucket", '{le="+Inf"}', wcount)
    sample("sandbox_proxy_wake_duration_seconds_sum", nil, sp_dict:get("m:wake_sum") or 0)
    sample("sandbox_proxy_wake_duration_seconds_count", nil, wcount)
    local wake_dict = shared.dict("wake") or sp_dict -- (wake.lua's choice too)
    metric("sandbox_proxy_wake_held_requests", "gauge", "Requests held for a waking sandbox.")
    sample("sandbox_proxy_wake_held_requests", nil, wake_dict:get("held:*") or 0)
    metric("sandbox_proxy_idle_suspends_total", "counter", "Idle sandboxes suspended.")
    sample("sandbox_proxy_idle_suspends_total", nil, sp_dict:get("m:idle_suspends") or 0)
    out[#out + 1] = ""
    return concat(out, "\n")
end

local HEADERS = { ["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8" }

function M.handle(req)
    local m = req:method()
    if m ~= "GET" and m ~= "HEAD" then
        return req:respond(405, { error = "method not allowed" }, { Allow = "GET, HEAD" })
    end
    req:respond(200, M.render(), HEADERS)
end

M.endpoints = { ["/metrics"] = M.handle }

return M
