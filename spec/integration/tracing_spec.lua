-- Tracing in the real binary on loopback: W3C traceparent / tracestate to the sandbox (the
-- client's trace or a new one, the proxy's span as parent, malformed values replaced), the
-- trace id in the access log, and the OTLP/HTTP JSON span export to a receiver in this suite
-- (spec/fixtures/otlp_receiver.py, Python standard library, run by the same python3 as the
-- fixture sandbox): the request and upstream spans linked by their parent ids, the wake span
-- of a request held while its sandbox woke (against the Kubernetes API stand-in), unsampled
-- traces not exported, the queue bound, and a receiver that is down (spans dropped, counted in
-- /metrics, one log line).
local H = require "spec.helpers.proxy"
local http = require "spec.helpers.http"
local prom = require "spec.helpers.prometheus"
local cjson = require "cjson"

local net = H.net
local process = H.process

local TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
local PARENT = "00f067aa0ba902b7"
local TP_PATTERN = "^00%-(%x+)%-(%x+)%-(%x%x)$"

-- The headers the sandbox received (the fixture's /echo), by lower-case name.
local function echoed(r)
    assert.are.equal(200, r.status, r.body)
    local out = {}
    for _, h in ipairs(cjson.decode(r.body).headers) do
        local k = h[1]:lower()
        assert.is_nil(out[k], "header " .. k .. " twice")
        out[k] = h[2]
    end
    return out
end

local function parse_tp(v)
    assert.is_string(v)
    local trace, parent, flags = v:match(TP_PATTERN)
    assert.is_truthy(trace, "not a traceparent: " .. tostring(v))
    assert.are.equal(32, #trace)
    assert.are.equal(16, #parent)
    assert.are.equal(trace, trace:lower())
    assert.are.equal(parent, parent:lower())
    assert.are_not.equal(string.rep("0", 32), trace)
    assert.are_not.equal(string.rep("0", 16), parent)
    return trace, parent, flags
end

-- The access-log line of request id rid.
local function access_line(px, rid)
    return px:wait_log(function(l) return l.request_id == rid end, 10, "stdout")
end

local function receiver(hold_ms)
    local dir = H.tmpdir()
    local port = assert(net.free_port())
    local p = assert(process.spawn{ cmd = { H.PYTHON, "-u", H.SOURCE_DIR .. "/spec/fixtures/otlp_receiver.py",
        "--listen", "127.0.0.1:" .. port, "--hold-ms", tostring(hold_ms or 0) },
        stdout = dir .. "/stdout.log", stderr = dir .. "/stderr.log" })
    assert(net.wait_port("127.0.0.1", port, 30, p))
    local rc = { port = port, proc = p }
    function rc.spans()
        local r = assert(http.request{ port = port, path = "/__spans" })
        return cjson.decode(r.body)
    end
    -- the spans of one trace, once n of them have arrived
    function rc.wait_trace(trace, n)
        return net.wait_until(function()
            local got = {}
            for _, s in ipairs(rc.spans().spans) do
                if s.traceId == trace then
                    got[#got + 1] = s
                end
            end
            return #got >= n and got
        end, 10, 0.02, n .. " spans of trace " .. trace)
    end
    return rc
end

local function attr(span, key)
    for _, a in ipairs(span.attributes) do
        if a.key == key then
            local v = a.value
            return v.stringValue or (v.intValue and tonumber(v.intValue))
        end
    end
end

local function metric(px, name)
    local port = px.metrics_port or px.port
    local exp = prom.assert_parse(assert(http.request{ port = port, path = "/metrics" }).body)
    return prom.value(exp, name)
end

-- A proxy whose /metrics is on its own listener (not traced), so that the spans of the main
-- listener can be counted exactly from the access log.
local function start_counted(up, set)
    local mport = assert(net.free_port())
    set.metrics_listen = "127.0.0.1:" .. mport
    local px = H.start{ sandboxes = { H.sandbox("alice", "s", up.port) }, set = set }
    px.metrics_port = mport
    return px
end

-- Spans made so far: one per request of the main listener, two when it was forwarded.
local function spans_made(px)
    local n = 0
    for _, l in ipairs(px:log_lines("stdout")) do
        if l.path ~= "/metrics" then
            n = n + (l.upstream and 2 or 1)
        end
    end
    return n
end

describe("trace propagation (the default)", function()
    local up, px

    setup(function()
        up = H.upstream{ name = "trace" }
        px = H.start{ sandboxes = { H.sandbox("alice", "s", up.port) } }
    end)

    teardown(function()
        H.stop_all()
    end)

    it("starts a trace when the client sent none, and logs its id", function()
        local r = assert(px:get("/alice/s/echo"))
        local h = echoed(r)
        local trace, parent, flags = parse_tp(h.traceparent)
        assert.are.equal("00", flags) -- not sampled: nothing is exported
        assert.is_nil(h.tracestate)
        local line = access_line(px, r.headers["x-request-id"])
        assert.are.equal(trace, line.trace_id)
        -- another request, another trace
        local h2 = echoed(assert(px:get("/alice/s/echo")))
        local trace2, parent2 = parse_tp(h2.traceparent)
        assert.are_not.equal(trace, trace2)
        assert.are_not.equal(parent, parent2)
    end)

    it("continues the client's trace with a new span of its own as the parent", function()
        local r = assert(px:get("/alice/s/echo", { traceparent = "00-" .. TRACE .. "-" .. PARENT .. "-01",
            tracestate = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7" }))
        local h = echoed(r)
        local trace, parent, flags = parse_tp(h.traceparent)
        assert.are.equal(TRACE, trace)
        assert.are_not.equal(PARENT, parent)
        assert.are.equal("01", flags)
        assert.are.equal("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7", h.tracestate)
        assert.are.equal(TRACE, access_line(px, r.headers["x-request-id"]).trace_id)
    end)

    -- W3C Trace Context 3.2/4.3: a traceparent that does not parse starts a new trace, and the
    -- tracestate that came with it is not passed on.
    local malformed = {
        { "upper-case hex", "00-" .. TRACE:upper() .. "-" .. PARENT .. "-01" },
        { "all-zero trace id", "00-" .. string.rep("0", 32) .. "-" .. PARENT .. "-01" },
        { "all-zero parent id", "00-" .. TRACE .. "-" .. string.rep("0", 16) .. "-01" },
        { "version ff", "ff-" .. TRACE .. "-" .. PARENT .. "-01" },
        { "short trace id", "00-" .. TRACE:sub(2) .. "-" .. PARENT .. "-01" },
        { "version 00 with more fields", "00-" .. TRACE .. "-" .. PARENT .. "-01-extra" },
        { "not hex", "00-" .. TRACE:sub(1, 31) .. "g-" .. PARENT .. "-01" },
        { "garbage", "hello" },
    }
    for _, case in ipairs(malformed) do
        it("replaces a malformed traceparent (" .. case[1] .. ") by a new trace", function()
            local r = assert(px:get("/alice/s/echo", { traceparent = case[2], tracestate = "congo=x" }))
            local h = echoed(r)
            local trace = parse_tp(h.traceparent)
            assert.are_not.equal(TRACE, trace)
            assert.are_not.equal(TRACE:upper(), trace)
            assert.is_nil(h.tracestate)
            assert.are.equal(trace, access_line(px, r.headers["x-request-id"]).trace_id)
        end)
    end

    it("accepts a later version's traceparent with more fields (read as version 00)", function()
        local h = echoed(assert(px:get("/alice/s/echo",
            { traceparent = "01-" .. TRACE .. "-" .. PARENT .. "-01-what-comes-later" })))
        local trace, _, flags = parse_tp(h.traceparent)
        assert.are.equal(TRACE, trace)
        assert.are.equal("01", flags)
    end)
end)

describe("a script's own traceparent", function()
    teardown(function()
        H.stop_all()
    end)

    it("wins over the proxy's (req:set_header), and removing it sends none", function()
        local up = H.upstream{ name = "own" }
        local dir = H.tmpdir()
        -- init.lua of its own: /set/... sets a traceparent, /remove/... removes it
        assert(process.write_file(dir .. "/init.lua", ([[
local M = {}
function M.on_request(req)
    local p = req:path()
    if p:find("^/set/") then
        req:set_header("traceparent", "00-%s-%s-01")
    elseif p:find("^/remove/") then
        req:remove_header("traceparent")
    end
    return req:forward("127.0.0.1", %d, "/echo")
end
return M
]]):format(TRACE, PARENT, up.port)))
        local px = H.start{ scripts = dir, ready_path = "/set/x" }
        local h = echoed(assert(px:get("/set/x", { traceparent = "00-" .. string.rep("1", 32) .. "-" .. PARENT .. "-00" })))
        assert.are.equal("00-" .. TRACE .. "-" .. PARENT .. "-01", h.traceparent)
        h = echoed(assert(px:get("/remove/x")))
        assert.is_nil(h.traceparent)
    end)
end)

describe("trace_propagation=false", function()
    teardown(function()
        H.stop_all()
    end)

    it("passes the client's headers on untouched and logs no trace id", function()
        local up = H.upstream{ name = "notrace" }
        local px = H.start{ sandboxes = { H.sandbox("alice", "s", up.port) },
            set = { trace_propagation = false } }
        local tp = "00-" .. TRACE .. "-" .. PARENT .. "-01"
        local r = assert(px:get("/alice/s/echo", { traceparent = tp, tracestate = "congo=x" }))
        local h = echoed(r)
        assert.are.equal(tp, h.traceparent)
        assert.are.equal("congo=x", h.tracestate)
        local h2 = echoed(assert(px:get("/alice/s/echo")))
        assert.is_nil(h2.traceparent)
        local line = access_line(px, r.headers["x-request-id"])
        assert.is_nil(line.trace_id)
    end)
end)

describe("OTLP span export", function()
    local up, rc, px

    setup(function()
        up = H.upstream{ name = "otlp" }
        rc = receiver()
        px = H.start{ sandboxes = { H.sandbox("alice", "s", up.port) },
            set = { otlp_endpoint = "http://127.0.0.1:" .. rc.port .. "/v1/traces",
                otlp_batch_interval = 0.05, otlp_service_name = "proxy-under-test" } }
    end)

    teardown(function()
        H.stop_all()
    end)

    it("exports the request span and the upstream span, linked, with the sandbox's parent", function()
        local r = assert(px:get("/alice/s/echo?x=1", { traceparent = "00-" .. TRACE .. "-" .. PARENT .. "-01" }))
        local h = echoed(r)
        local _, sandbox_parent = parse_tp(h.traceparent)
        local spans = rc.wait_trace(TRACE, 2)
        assert.are.equal(2, #spans)
        local req_span, up_span
        for _, s in ipairs(spans) do
            if s.kind == 2 then req_span = s elseif s.kind == 3 then up_span = s end
        end
        assert.is_truthy(req_span, "no SERVER span")
        assert.is_truthy(up_span, "no CLIENT span")
        -- the request span continues the client's span; the upstream span is its child; the
        -- sandbox's parent is the upstream span
        assert.are.equal(PARENT, req_span.parentSpanId)
        assert.are.equal(req_span.spanId, up_span.parentSpanId)
        assert.are.equal(sandbox_parent, up_span.spanId)
        assert.are_not.equal(req_span.spanId, up_span.spanId)
        assert.are.equal("proxy-under-test", req_span.service)
        assert.are.equal("GET", req_span.name)
        assert.are.equal("GET", attr(req_span, "http.request.method"))
        assert.are.equal("/alice/s/echo", attr(req_span, "url.path"))
        assert.are.equal(200, attr(req_span, "http.response.status_code"))
        assert.are.equal(r.headers["x-request-id"], attr(req_span, "sandbox_proxy.request_id"))
        assert.are.equal("127.0.0.1", attr(up_span, "server.address"))
        assert.are.equal(up.port, attr(up_span, "server.port"))
        assert.are.equal(200, attr(up_span, "http.response.status_code"))
        -- times: the upstream span lies within the request span
        local function ns(v) return tonumber(v) end
        assert.is_true(ns(req_span.startTimeUnixNano) <= ns(up_span.startTimeUnixNano))
        assert.is_true(ns(up_span.endTimeUnixNano) <= ns(req_span.endTimeUnixNano))
        assert.is_true(ns(req_span.startTimeUnixNano) > 1.5e18) -- unix time in ns, not uptime
        assert.are.equal(0, req_span.status.code)
        net.wait_until(function()
            return metric(px, "sandbox_proxy_trace_spans_exported_total") >= 2
        end, 10, 0.02, "exported spans counted")
    end)

    it("starts a sampled trace for a client without one: a request span without a parent", function()
        local r = assert(px:get("/alice/s/echo"))
        local trace, sandbox_parent, flags = parse_tp(echoed(r).traceparent)
        assert.are.equal("01", flags)
        local spans = rc.wait_trace(trace, 2)
        for _, s in ipairs(spans) do
            if s.kind == 2 then
                assert.is_nil(s.parentSpanId)
            else
                assert.are.equal(sandbox_parent, s.spanId)
            end
        end
        assert.are.equal(trace, access_line(px, r.headers["x-request-id"]).trace_id)
    end)

    it("exports one span for a request the proxy answers itself (no upstream span)", function()
        local trace = "aaaabbbbccccddddeeeeffff00001111"
        assert.are.equal(404, assert(px:get("/alice/nope/x",
            { traceparent = "00-" .. trace .. "-" .. PARENT .. "-01" })).status)
        local spans = rc.wait_trace(trace, 1)
        assert.are.equal(1, #spans)
        assert.are.equal(2, spans[1].kind)
        assert.are.equal(404, attr(spans[1], "http.response.status_code"))
    end)

    it("exports nothing for a trace the client did not sample", function()
        local unsampled = "11112222333344445555666677778888"
        local sampled = "9999aaaabbbbccccddddeeeeffff0000"
        local h = echoed(assert(px:get("/alice/s/echo", { traceparent = "00-" .. unsampled .. "-" .. PARENT .. "-00" })))
        assert.are.equal("00", select(3, parse_tp(h.traceparent)))
        -- a sampled request after it: once its spans are in, the unsampled one's would be too
        assert(px:get("/alice/s/echo", { traceparent = "00-" .. sampled .. "-" .. PARENT .. "-01" }))
        rc.wait_trace(sampled, 2)
        for _, s in ipairs(rc.spans().spans) do
            assert.are_not.equal(unsampled, s.traceId)
        end
    end)
end)

describe("OTLP span export limits", function()
    teardown(function()
        H.stop_all()
    end)

    it("drops and counts spans beyond otlp_queue_size", function()
        local up = H.upstream{ name = "q" }
        -- a collector that takes 3 s per POST: a full queue goes out at once, and while that
        -- POST is under way the queue fills again and the rest is dropped
        local rc = receiver(3000)
        local px = start_counted(up, { otlp_endpoint = "http://127.0.0.1:" .. rc.port .. "/v1/traces",
            otlp_batch_interval = 3600, otlp_queue_size = 3 })
        local rids = {}
        for i = 1, 4 do
            local r = assert(px:get("/alice/s/echo"))
            echoed(r)
            rids[i] = r.headers["x-request-id"]
        end
        for _, rid in ipairs(rids) do
            access_line(px, rid) -- logged, so its spans are made
        end
        -- the readiness polls of the start made spans too (the access log has them all)
        local made = spans_made(px)
        assert.is_true(made >= 9, made)
        -- one POST of 3 under way, at most 3 queued: everything else dropped and counted
        local dropped = metric(px, "sandbox_proxy_trace_spans_dropped_total")
        assert.is_true(dropped >= made - 6 and dropped <= made - 3, dropped .. " of " .. made)
        local got = net.wait_until(function()
            local g = rc.spans()
            return g.posts >= 1 and g
        end, 10, 0.05, "the first POST")
        assert.are.equal(1, got.posts) -- the interval is an hour: only the full queue went out
        assert.are.same({ 3 }, got.batches)
        net.wait_until(function()
            return metric(px, "sandbox_proxy_trace_spans_exported_total") == 3
        end, 10, 0.05, "the held POST answered and counted")
        assert.are.equal(dropped, metric(px, "sandbox_proxy_trace_spans_dropped_total"))
    end)

    it("drops and counts the spans of exports that fail (receiver down), with one log line", function()
        local up = H.upstream{ name = "down" }
        local port = assert(net.free_port()) -- nothing listens there
        local px = start_counted(up, { otlp_endpoint = "http://127.0.0.1:" .. port .. "/v1/traces",
            otlp_batch_interval = 0.05 })
        local rids = {}
        for i = 1, 3 do
            local r = assert(px:get("/alice/s/echo"))
            echoed(r)
            rids[i] = r.headers["x-request-id"]
        end
        for _, rid in ipairs(rids) do
            access_line(px, rid)
        end
        local made = spans_made(px)
        assert.is_true(made >= 7, made)
        -- every span is dropped: each batch's POST fails
        net.wait_until(function()
            return metric(px, "sandbox_proxy_trace_spans_dropped_total") == made
        end, 10, 0.02, made .. " dropped spans counted")
        assert.are.equal(0, metric(px, "sandbox_proxy_trace_spans_exported_total"))
        px:wait_log(function(l) return l.msg == "span export failed: spans dropped" end)
        local n = 0
        for _, l in ipairs(px:log_lines()) do
            if l.msg == "span export failed: spans dropped" then
                n = n + 1
            end
        end
        assert.are.equal(1, n) -- one line per failure streak, not one per batch
        -- the proxy itself is unaffected
        assert.are.equal(200, assert(px:get("/alice/s/echo")).status)
    end)
end)

-- The wake span: a request held while its suspended sandbox wakes (wake.lua, against the
-- Kubernetes API stand-in and its fake controller) gets a third span, "wake" (INTERNAL), a
-- child of the request span that ends before the upstream span starts, with the outcome and
-- whether this request's wake sent the PATCH.
describe("the wake span", function()
    local K = require "spec.helpers.kube"
    local socket = require "socket"
    local WAKE_CONFIG = "return { wake = { enabled = true, max_wait = %d }, "
        .. "ratelimit = { enabled = false } }"

    local function suspended(name, port)
        return H.sandbox("alice", name, port, { ready = false, reason = "SandboxSuspended",
            mode = "Suspended" })
    end

    local function start(api, rc, max_wait)
        return api:proxy{ config = WAKE_CONFIG:format(max_wait or 20),
            set = { otlp_endpoint = "http://127.0.0.1:" .. rc.port .. "/v1/traces",
                otlp_batch_interval = 0.05 } }
    end

    -- the spans of a trace by kind: 2 the request, 1 the wake, 3 the upstream exchange
    local function by_kind(spans)
        local out = {}
        for _, s in ipairs(spans) do
            assert.is_nil(out[s.kind], "two spans of kind " .. s.kind)
            out[s.kind] = s
        end
        return out[2], out[1], out[3]
    end

    local function bool_attr(span, key)
        for _, a in ipairs(span.attributes) do
            if a.key == key then
                return a.value.boolValue
            end
        end
    end

    local function trace_of(i)
        return ("%032x"):format(0xabc000 + i)
    end

    teardown(function()
        H.stop_all()
    end)

    it("covers the hold from the request to Ready, before the upstream span, once per request",
        function()
        local up = H.upstream{ name = "woken" }
        local rc = receiver()
        local api = K.start{}
        api:wake_config{ wake_never = true } -- Ready only when this spec says so
        api:put(suspended("sleepy", up.port))
        local px = start(api, rc)
        -- two requests for the sleeping sandbox, each with its own sampled trace
        local conns = {}
        for i = 1, 2 do
            local c = assert(px:connect{ timeout = 30 })
            assert(c:send_raw("GET /alice/sleepy/echo HTTP/1.1\r\nHost: x\r\ntraceparent: 00-"
                .. trace_of(i) .. "-" .. PARENT .. "-01\r\n\r\n"))
            conns[i] = c
        end
        net.wait_until(function()
            local exp = prom.assert_parse(assert(px:get("/metrics")).body)
            return prom.value(exp, "sandbox_proxy_wake_held_requests") == 2
        end, 10, 0.02, "both requests held")
        local t_held = socket.gettime()
        -- the controller's work, done by hand: the woken sandbox becomes ready
        net.wait_until(function()
            return api:stats().patches and next(api:stats().patches) ~= nil
        end, 10, 0.02, "the wake PATCH")
        local t_ready = socket.gettime()
        api:put(H.sandbox("alice", "sleepy", up.port))
        for _, c in ipairs(conns) do
            assert.are.equal(200, assert(c:read_response{ timeout = 30 }).status)
            c:close()
        end
        local patched = 0
        for i = 1, 2 do
            local req_span, wake, upstream = by_kind(rc.wait_trace(trace_of(i), 3))
            assert.is_truthy(req_span and wake and upstream, "request, wake and upstream spans")
            assert.are.equal("wake", wake.name)
            assert.are.equal(req_span.spanId, wake.parentSpanId)
            assert.are.equal(req_span.spanId, upstream.parentSpanId)
            assert.are_not.equal(wake.spanId, req_span.spanId)
            assert.are_not.equal(wake.spanId, upstream.spanId)
            assert.are.equal("ready", attr(wake, "sandbox_proxy.wake.outcome"))
            assert.are.equal(0, wake.status.code)
            if bool_attr(wake, "sandbox_proxy.wake.patched") then
                patched = patched + 1
            end
            local ws, we = tonumber(wake.startTimeUnixNano), tonumber(wake.endTimeUnixNano)
            -- within the request span, before the upstream exchange
            assert.is_true(tonumber(req_span.startTimeUnixNano) <= ws)
            assert.is_true(we <= tonumber(upstream.startTimeUnixNano))
            assert.is_true(tonumber(upstream.endTimeUnixNano) <= tonumber(req_span.endTimeUnixNano))
            -- held from before both were seen held until after the sandbox was made ready
            -- (10 ms for the two clocks: the span's is the proxy's CLOCK_REALTIME at start)
            assert.is_true(ws / 1e9 <= t_held + 0.01, ("wake start %.3f, held seen %.3f")
                :format(ws / 1e9, t_held))
            assert.is_true(we / 1e9 >= t_ready - 0.01, ("wake end %.3f, made ready %.3f")
                :format(we / 1e9, t_ready))
        end
        assert.are.equal(1, patched) -- one PATCH for both: the first request's wake sent it
    end)

    it("ends as an error with the refused PATCH's status, and no upstream span", function()
        local up = H.upstream{ name = "denied" }
        local rc = receiver()
        local api = K.start{}
        api:put(suspended("denied", up.port))
        local px = start(api, rc)
        api:faults{ status = 403, kinds = { "patch" }, count = 1 }
        local trace = trace_of(10)
        local r = assert(px:request{ path = "/alice/denied/echo", timeout = 20,
            headers = { traceparent = "00-" .. trace .. "-" .. PARENT .. "-01" } })
        assert.are.equal(503, r.status)
        -- (a request's spans are queued together, so they arrive in one POST)
        local req_span, wake, upstream = by_kind(rc.wait_trace(trace, 2))
        assert.is_nil(upstream)
        assert.are.equal(req_span.spanId, wake.parentSpanId)
        assert.are.equal("failed", attr(wake, "sandbox_proxy.wake.outcome"))
        assert.are.equal(403, attr(wake, "sandbox_proxy.wake.patch_status"))
        assert.is_true(bool_attr(wake, "sandbox_proxy.wake.patched"))
        assert.are.equal(2, wake.status.code)
        assert.are.equal(503, attr(req_span, "http.response.status_code"))
    end)

    it("ends as an error at the deadline of a wake that never completes", function()
        local up = H.upstream{ name = "stuck" }
        local rc = receiver()
        local api = K.start{}
        api:wake_config{ wake_never = true }
        api:put(suspended("stuck", up.port))
        local px = start(api, rc, 1)
        local trace = trace_of(20)
        local r = assert(px:request{ path = "/alice/stuck/echo", timeout = 20,
            headers = { traceparent = "00-" .. trace .. "-" .. PARENT .. "-01" } })
        assert.are.equal(503, r.status)
        local _, wake, upstream = by_kind(rc.wait_trace(trace, 2))
        assert.is_nil(upstream)
        assert.are.equal("timeout", attr(wake, "sandbox_proxy.wake.outcome"))
        assert.are.equal(2, wake.status.code)
        -- held to the deadline (max_wait = 1 s)
        assert.is_true(tonumber(wake.endTimeUnixNano) - tonumber(wake.startTimeUnixNano) >= 0.99e9)
    end)
end)
