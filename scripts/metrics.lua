-- metrics.lua: GET /metrics in the Prometheus text exposition format (version 0.0.4). Served on
-- the main listener, or only on its own listener when metrics_listen is set. Everything comes
-- from counters the runtime keeps in C (per worker, added up here) or from shared dicts, so a
-- scrape costs the same whatever the traffic, and a request costs nothing extra.
--   sandbox_proxy_requests_total{method,code}     requests by method and status class (2xx..)
--   sandbox_proxy_request_duration_seconds        histogram of request durations
--   sandbox_proxy_upstream_connect_errors_total, sandbox_proxy_upstream_timeouts_total
--   sandbox_proxy_ratelimited_total{kind="rate"|"concurrency"}
--   sandbox_proxy_open_connections, sandbox_proxy_open_tunnels, sandbox_proxy_active_requests
--   sandbox_proxy_routes{ready="true"|"false"}
--   sandbox_proxy_watch_relists_total, sandbox_proxy_watch_seconds_since_event,
--   sandbox_proxy_watch_synced, sandbox_proxy_script_errors_total,
--   sandbox_proxy_parse_errors_total, sandbox_proxy_shared_dict_evictions_total{dict},
--   sandbox_proxy_shared_dict_used_bytes{dict}, sandbox_proxy_accesslog_dropped_total,
--   sandbox_proxy_trace_spans_exported_total, sandbox_proxy_trace_spans_dropped_total,
--   sandbox_proxy_lua_memory_bytes (the answering worker's state)
local core = require "sp.core"
local routes = require "sp.routes"
local shared = require "sp.shared"
local cjson = require "cjson.safe"

local concat = table.concat
local format = string.format

local sp_dict = assert(shared.dict("sp"))
local M = {}

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

    metric("sandbox_proxy_request_duration_seconds", "histogram",
        "Time from the first request byte to the end of the response.")
    local cum = 0
    for _, b in ipairs(st.latency_buckets) do
        cum = cum + b[2]
        local le = b[1] == "+Inf" and "+Inf" or num(b[1])
        sample("sandbox_proxy_request_duration_seconds_bucket", format('{le="%s"}', le), cum)
    end
    sample("sandbox_proxy_request_duration_seconds_sum", nil, st.latency_sum)
    sample("sandbox_proxy_request_duration_seconds_count", nil, cum)

    metric("sandbox_proxy_upstream_connect_errors_total", "counter",
        "Connections to sandboxes that failed (after retries).")
    sample("sandbox_proxy_upstream_connect_errors_total", nil, st.upstream_connect_errors)
    metric("sandbox_proxy_upstream_timeouts_total", "counter", "Upstream connect and first-byte timeouts.")
    sample("sandbox_proxy_upstream_timeouts_total", nil, st.upstream_timeouts)

    metric("sandbox_proxy_ratelimited_total", "counter", "Requests refused by ratelimit.lua.")
    sample("sandbox_proxy_ratelimited_total", '{kind="rate"}', sp_dict:get("m:ratelimited") or 0)
    sample("sandbox_proxy_ratelimited_total", '{kind="concurrency"}',
        sp_dict:get("m:concurrency_limited") or 0)

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
