-- bench/k8s.lua: Kubernetes discovery figures, against the project's API server stand-in.
--   1. event-to-route latency: the stand-in emits MODIFIED (ready=true) for a sandbox that was
--      not ready; we time until the first 200 through the proxy. p50/p99 over N events.
--   2. sync of 100,000 sandboxes: time from the proxy's start to /ready, and peak RSS.
--   3. wake on request: the time a request for a suspended sandbox takes beyond the stand-in's
--      own wake delay (PATCH -> Ready=True after wake_delay_ms), p50/p99 over N wakes.
-- Run from the repository root:  bench/k8s [--events N] [--sandboxes N]
-- (bench/k8s is a wrapper that sets LUA_PATH and runs this with luajit).
local H = require "spec.helpers.proxy"
local K = require "spec.helpers.kube"
local process = require "spec.helpers.process"
local socket = require "socket"
local http = require "spec.helpers.http"

local args = { events = 1000, sandboxes = 100000, wakes = 100, wake_delay = 200 }
local i = 1
while arg[i] do
    local k = arg[i]:match("^%-%-(.+)$")
    if k and args[k] then
        args[k] = tonumber(arg[i + 1])
        i = i + 1
    end
    i = i + 1
end

local function percentile(t, p)
    table.sort(t)
    local idx = math.max(1, math.ceil(#t * p))
    return t[idx]
end

local function fmt_ms(s)
    return ("%.2f ms"):format(s * 1000)
end

local ok, err = pcall(function()
    local up = H.upstream{ name = "bench" }
    ----------------------------------------------------------------- 1. latency
    local api = K.start{ bookmark_interval = 5, rv_step_max = 1, history = 100000 }
    local px = api:proxy{}
    local c = assert(px:connect{ timeout = 5 })
    local lat, rtt = {}, {}
    for n = 1, args.events do
        local name = "lat" .. (n % 50)
        api:put(H.sandbox("bench", name, up.port, { ready = false }))
        repeat
            local r = assert(c:request{ path = "/bench/" .. name .. "/" })
        until r.status == 503
        local t0 = socket.gettime()
        api:put(H.sandbox("bench", name, up.port, { ready = true }))
        local t1 = socket.gettime()
        rtt[#rtt + 1] = t1 - t0
        while true do
            local r = assert(c:request{ path = "/bench/" .. name .. "/" })
            if r.status == 200 then
                break
            end
        end
        lat[#lat + 1] = socket.gettime() - t0
    end
    c:close()
    print(("event-to-route latency over %d events (from the control call that emits MODIFIED "
        .. "ready=true to the first 200 through the proxy):"):format(args.events))
    print(("  p50 %s   p99 %s   max %s"):format(fmt_ms(percentile(lat, 0.5)),
        fmt_ms(percentile(lat, 0.99)), fmt_ms(lat[#lat])))
    print(("  (includes the stand-in's control round trip: p50 %s, p99 %s)"):format(
        fmt_ms(percentile(rtt, 0.5)), fmt_ms(percentile(rtt, 0.99))))
    px:stop()
    api:stop()

    ----------------------------------------------------------------- 2. big sync
    local api2 = K.start{ bookmark_interval = 5, history = args.sandboxes + 10 }
    local tb = socket.gettime()
    api2:bulk{ count = args.sandboxes, namespace = "default", user_label_prefix = "u",
        ready = true, pod_ip = "127.0.0.1" }
    print(("\nstand-in: %d sandboxes created in %.2f s"):format(args.sandboxes, socket.gettime() - tb))
    local t0 = socket.gettime()
    local px2 = api2:proxy{ wait = false }
    H.net.wait_until(function()
        local r = http.request{ port = px2.port, path = "/ready", timeout = 1 }
        return r and r.status == 200
    end, 120, 0.01)
    local took = socket.gettime() - t0
    local status = process.read_file("/proc/" .. px2:pid() .. "/status")
    local hwm = tonumber(status:match("VmHWM:%s*(%d+)"))
    local rss = tonumber(status:match("VmRSS:%s*(%d+)"))
    local h = px2:json("/health")
    print(("sync of %d sandboxes: %.2f s from process start to /ready 200; %d routes"):format(
        args.sandboxes, took, h.sandboxes))
    print(("  peak RSS %.1f MiB, RSS after sync %.1f MiB"):format(hwm / 1024, rss / 1024))
    local r = http.request{ port = px2.port, path = "/u00042/sb-00042/echo" }
    -- The bulk sandboxes point at 127.0.0.1:8888, where nothing listens: 502 means the route was
    -- found and the connect tried; 404 or 503 would mean the sync missed or mis-mapped it.
    print(("  a routed request after the sync: %s%s"):format(r and r.status or "failed",
        r and r.status == 502 and " (route found; nothing listens at 127.0.0.1:8888)" or " (UNEXPECTED)"))
    px2:stop()
    api2:stop()

    ----------------------------------------------------------------- 3. wake latency
    local api3 = K.start{ bookmark_interval = 5, history = 100000 }
    api3:wake_config{ wake_delay_ms = args.wake_delay, wake_pod_ip = "127.0.0.1" }
    local px3 = api3:proxy{ config = "return { wake = { enabled = true, max_wait = 30 } }" }
    local extra = {}
    for n = 1, args.wakes do
        local name = "w" .. n
        api3:put(H.sandbox("bench", name, up.port, { ready = false, reason = "SandboxSuspended",
            mode = "Suspended" }))
        H.net.wait_until(function()
            local rr = http.request{ port = px3.port, path = "/sandboxes" }
            return rr and rr.body:find('"bench/' .. name .. '"', 1, true)
        end, 10, 0.005)
        local t0 = socket.gettime()
        local rr = assert(http.request{ port = px3.port, path = "/bench/" .. name .. "/", timeout = 30 })
        assert(rr.status == 200, "wake " .. n .. ": " .. rr.status)
        extra[#extra + 1] = socket.gettime() - t0 - args.wake_delay / 1000
    end
    print(("\nwake on request over %d wakes (stand-in wake delay %d ms): added latency "
        .. "p50 %s, p99 %s"):format(args.wakes, args.wake_delay, fmt_ms(percentile(extra, 0.5)),
        fmt_ms(percentile(extra, 0.99))))
end)
H.stop_all()
if not ok then
    io.stderr:write(tostring(err) .. "\n")
    os.exit(1)
end
