-- Wake on request and idle suspend, against the Kubernetes API stand-in, whose fake controller
-- takes time on every transition (PATCH accepted with the status still suspended, then
-- Ready=False DependenciesNotReady while the pod starts, then Ready=True). With the documented
-- default config (only `enabled = true`): a suspended sandbox woken by a request that then
-- succeeds; a crowd spread over the whole start (before the PATCH lands, while the status still
-- says suspended, while the pod starts, once ready) all answered 200 with one PATCH, on one and
-- two workers; no second PATCH while the status still says suspended; a wake started by another
-- replica held for; a refused PATCH answered 503 with its status; a wake that never completes
-- (503 at the deadline); held-request limits; a client leaving while held; terminal reasons
-- never woken; starting sandboxes waited for only with wait_starting; v1alpha1; idle suspend
-- after the timeout and never with a tunnel open; replicas coordinating through their activity
-- Leases (coordination.k8s.io, served by the stand-in): two replicas suspending once, only when
-- both idle; a tunnel on one replica keeping the others from suspending, also when that
-- tunnel's request woke the sandbox (the race that once suspended it: the other replica's idle
-- clock ignored the wake and the waker published the held request only after the start) and
-- when it opens right after a request the Lease already reported (published open at once, not
-- at the next renewal); a replica that stops renewing no longer counting; Lease writes bounded
-- per replica and interval, not per sandbox. The sandboxes of the multi-replica specs get their
-- idle timeout once every replica routes them (arm_idle), so that a slow start (ASan) does not
-- suspend them before the traffic under test.
local H = require "spec.helpers.proxy"
local K = require "spec.helpers.kube"
local ws = require "spec.helpers.ws"
local socket = require "socket"
local cjson = require "cjson"
local prom = require "spec.helpers.prometheus"

local function suspended(user, name, port, opts)
    opts = opts or {}
    local obj = H.sandbox(user, name, port, { ready = false, reason = "SandboxSuspended",
        mode = "Suspended", namespace = opts.namespace })
    if opts.annotations then
        for k, v in pairs(opts.annotations) do
            obj.metadata.annotations[k] = v
        end
    end
    return obj
end

local function patches(api, name)
    local n = 0
    for k, v in pairs(api:stats().patches or {}) do
        if k:match("/" .. name .. "$") then
            n = n + v
        end
    end
    return n
end

-- The documented defaults (wait_starting off), with short idle intervals for the idle specs.
local function wake_config(extra)
    extra = extra or {}
    return "return { wake = { enabled = true, max_wait = " .. (extra.max_wait or 20)
        .. ", max_held_per_sandbox = " .. (extra.max_held_per_sandbox or 100)
        .. (extra.wait_starting ~= nil and (", wait_starting = " .. tostring(extra.wait_starting))
            or "")
        .. ", check_interval = 0.2, activity_interval = " .. (extra.activity_interval or 0.5)
        .. ", activity_flush = 0.25"
        .. (extra.lease_duration and (", lease_duration = " .. extra.lease_duration) or "")
        .. (extra.replica and (", replica = '" .. extra.replica .. "'") or "")
        .. " }, ratelimit = { enabled = false } }"
end

-- The proxy's view of one sandbox (its /sandboxes listing).
local function view(px, name)
    for _, s in ipairs(px:json("/sandboxes").sandboxes) do
        if s.name == name then
            return s
        end
    end
    error("sandbox " .. name .. " not listed")
end

-- The Ready condition of the stored object (what the fake controller wrote last).
local function stored_ready(api, name)
    for _, c in ipairs(api:call("GET", "/objects/default/" .. name).status.conditions or {}) do
        if c.type == "Ready" then
            return c
        end
    end
end

-- Opens n connections, each sending one GET for path; appends them to conns.
local function send(px, conns, path, n)
    for _ = 1, n do
        local c = assert(px:connect{ timeout = 30 })
        assert(c:send_raw("GET " .. path .. " HTTP/1.1\r\nHost: x\r\n\r\n"))
        conns[#conns + 1] = c
    end
end

describe("wake on request", function()
    local up

    setup(function()
        up = H.upstream{ name = "woken" }
    end)

    teardown(function()
        H.stop_all()
    end)

    it("wakes a suspended sandbox and then serves the held request", function()
        local api = K.start{}
        api:wake_config{ start_delay_ms = 200, wake_delay_ms = 300, wake_pod_ip = "127.0.0.1" }
        api:put(suspended("alice", "sleepy", up.port))
        local px = api:proxy{ config = wake_config() }
        assert.are.equal(false, view(px, "sleepy").ready)
        local t0 = socket.gettime()
        local r = assert(px:request{ path = "/alice/sleepy/echo", timeout = 20 })
        assert.are.equal(200, r.status)
        assert.are.equal("woken", r.headers["x-upstream-name"])
        assert.is_true(socket.gettime() - t0 >= 0.5) -- held through both controller steps
        assert.are.equal(1, patches(api, "sleepy"))
        -- once awake it is served directly
        assert.are.equal(200, assert(px:get("/alice/sleepy/echo")).status)
        assert.are.equal(1, patches(api, "sleepy"))
        -- counted: one wake, its duration (held through both controller steps), none held now
        local exp = prom.assert_parse(assert(px:get("/metrics")).body)
        assert.are.equal(1, prom.value(exp, "sandbox_proxy_wakes_total"))
        assert.are.equal(0, prom.value(exp, "sandbox_proxy_wake_failures_total"))
        assert.are.equal(1, prom.value(exp, "sandbox_proxy_wake_duration_seconds_count"))
        assert.is_true(prom.value(exp, "sandbox_proxy_wake_duration_seconds_sum") >= 0.5)
        assert.are.equal(0, prom.value(exp, "sandbox_proxy_wake_duration_seconds_bucket",
            { le = "0.5" }))
        assert.are.equal(0, prom.value(exp, "sandbox_proxy_wake_held_requests"))
    end)

    it("wakes a suspended sandbox for a header-routed (agent-sandbox SDK) request too", function()
        local api = K.start{}
        api:wake_config{ start_delay_ms = 200, wake_delay_ms = 300, wake_pod_ip = "127.0.0.1" }
        api:put(suspended(nil, "sdksleepy", up.port, { namespace = "team-a" }))
        local px = api:proxy{ config = wake_config() }
        local headers = { { "X-Sandbox-ID", "sdksleepy" }, { "X-Sandbox-Namespace", "team-a" },
            { "X-Sandbox-Port", tostring(up.port) } }
        local r = assert(px:request{ method = "POST", path = "/echo", body = "{}",
            headers = headers, timeout = 20 })
        assert.are.equal(200, r.status)
        assert.are.equal("woken", r.headers["x-upstream-name"])
        assert.are.equal(1, patches(api, "sdksleepy"))
        -- a refused PATCH answers with the router's "detail" as well
        api:put(suspended(nil, "sdkdenied", up.port))
        api:faults{ status = 403, kinds = { "patch" }, count = 1 }
        H.net.wait_until(function()
            for _, v in ipairs(px:json("/sandboxes").sandboxes) do
                if v.name == "sdkdenied" then
                    return true
                end
            end
        end, 10, 0.02, "the proxy to see sdkdenied")
        r = assert(px:request{ path = "/echo", timeout = 20, headers = {
            { "X-Sandbox-ID", "sdkdenied" }, { "X-Sandbox-Port", tostring(up.port) } } })
        assert.are.equal(503, r.status)
        local b = cjson.decode(r.body)
        assert.are.equal("Sandbox 'sdkdenied' could not be woken.", b.detail)
        assert.are.equal(403, b.status)
    end)

    -- A crowd spread over the start window with the documented defaults: some requests before
    -- the PATCH lands, some while the status still says suspended, some while the pod starts
    -- (DependenciesNotReady), some once ready. Every one gets the sandbox's answer; one PATCH.
    for _, workers in ipairs({ 1, 2 }) do
        it("holds a crowd spread over the whole start and serves every request, with one PATCH ("
            .. workers .. " worker" .. (workers > 1 and "s" or "") .. ", default config)", function()
            local api = K.start{}
            api:wake_config{ start_delay_ms = 1500, wake_delay_ms = 1500,
                wake_pod_ip = "127.0.0.1" }
            local name = "spread" .. workers
            local path = "/kim/" .. name .. "/echo"
            api:put(suspended("kim", name, up.port))
            local px = api:proxy{ workers = workers, config = wake_config() }
            local conns = {}
            -- 1: the spec still says Suspended (the first request claims the PATCH)
            send(px, conns, path, 10)
            -- 2: PATCH accepted, the status still says suspended
            H.net.wait_until(function()
                local v = view(px, name)
                return v.mode == "Running" and v.reason == "SandboxSuspended"
            end, 15, 0.02, "the proxy to see the PATCH land")
            send(px, conns, path, 10)
            assert.are.equal("SandboxSuspended", stored_ready(api, name).reason,
                "the controller moved on before the requests went out: raise start_delay_ms")
            -- 3: the pod is starting
            H.net.wait_until(function()
                return view(px, name).reason == "DependenciesNotReady"
            end, 15, 0.02, "the proxy to see the pod starting")
            send(px, conns, path, 10)
            assert.are.equal("DependenciesNotReady", stored_ready(api, name).reason,
                "the controller moved on before the requests went out: raise wake_delay_ms")
            -- 4: ready
            H.net.wait_until(function() return view(px, name).ready end, 15, 0.02,
                "the proxy to see the sandbox ready")
            send(px, conns, path, 5)
            local answers = {}
            for i, c in ipairs(conns) do
                local r = assert(c:read_response{ timeout = 30 })
                answers[#answers + 1] = r.status == 200 and "200"
                    or (i .. ": " .. r.status .. " " .. r.body)
                c:close()
            end
            for i, a in ipairs(answers) do
                assert.are.equal("200", a, "request " .. i)
            end
            assert.are.equal(35, #answers)
            assert.are.equal(1, patches(api, name))
        end)
    end

    it("never PATCHes again while the status still says suspended after its PATCH", function()
        local api = K.start{}
        -- a slow controller: the status says suspended for 2.5 s after the PATCH
        api:wake_config{ start_delay_ms = 2500, wake_delay_ms = 300, wake_pod_ip = "127.0.0.1" }
        api:put(suspended("lee", "slow", up.port))
        local px = api:proxy{ workers = 2, config = wake_config() }
        local conns = {}
        send(px, conns, "/lee/slow/echo", 1)
        H.net.wait_until(function()
            local v = view(px, "slow")
            return v.mode == "Running" and v.reason == "SandboxSuspended"
        end, 15, 0.02, "the proxy to see the PATCH land")
        -- requests keep arriving while the status still says suspended (bounded: 20)
        for _ = 1, 20 do
            if stored_ready(api, "slow").reason ~= "SandboxSuspended" then
                break
            end
            send(px, conns, "/lee/slow/echo", 1)
            socket.sleep(0.05) -- spreads the arrivals over the window under test
        end
        assert.is_true(#conns >= 5, "too few requests in the window: " .. #conns)
        for _, c in ipairs(conns) do
            assert.are.equal(200, assert(c:read_response{ timeout = 30 }).status)
            c:close()
        end
        assert.are.equal(1, patches(api, "slow"))
        local woke = 0
        for _, l in ipairs(px:log_lines()) do
            woke = woke + (l.msg == "woke a suspended sandbox" and 1 or 0)
        end
        assert.are.equal(1, woke)
    end)

    it("holds the requests for a sandbox another replica is waking, and PATCHes nothing", function()
        local api = K.start{}
        api:wake_config{ start_delay_ms = 1500, wake_delay_ms = 1500, wake_pod_ip = "127.0.0.1" }
        api:put(suspended("max", "other", up.port))
        local px = api:proxy{ config = wake_config() }
        assert.are.equal("Suspended", view(px, "other").mode)
        -- another replica's PATCH (through the API, so the fake controller reacts)
        local r = assert(H.http.request{ port = api.port, method = "PATCH",
            path = "/apis/agents.x-k8s.io/v1beta1/namespaces/default/sandboxes/other",
            body = '{"spec":{"operatingMode":"Running"}}',
            headers = { { "Content-Type", "application/merge-patch+json" } } })
        assert.are.equal(200, r.status)
        local conns = {}
        H.net.wait_until(function() return view(px, "other").mode == "Running" end, 15, 0.02)
        send(px, conns, "/max/other/echo", 5)
        H.net.wait_until(function()
            return view(px, "other").reason == "DependenciesNotReady"
        end, 15, 0.02, "the proxy to see the pod starting")
        send(px, conns, "/max/other/echo", 5)
        assert.are.equal("DependenciesNotReady", stored_ready(api, "other").reason,
            "the controller moved on before the requests went out: raise wake_delay_ms")
        for _, c in ipairs(conns) do
            assert.are.equal(200, assert(c:read_response{ timeout = 30 }).status)
            c:close()
        end
        assert.are.equal(1, patches(api, "other")) -- the other replica's only
    end)

    it("answers 503 with the API server's status when the PATCH is refused, and logs it", function()
        local api = K.start{}
        api:put(suspended("ned", "denied", up.port))
        local px = api:proxy{ config = wake_config() }
        api:faults{ status = 403, kinds = { "patch" }, count = 1 }
        local r = assert(px:request{ path = "/ned/denied/echo", timeout = 20 })
        assert.are.equal(503, r.status)
        assert.are.same({ error = "sandbox wake failed", path = "ned/denied", status = 403 },
            cjson.decode(r.body))
        assert.is_truthy(r.headers["retry-after"])
        local line = px:wait_log(function(l) return l.msg == "cannot wake the sandbox" end)
        assert.are.equal(403, line.status)
        assert.is_truthy(tostring(line.hint):find("rbac-wake", 1, true))
        local exp = prom.assert_parse(assert(px:get("/metrics")).body)
        assert.are.equal(1, prom.value(exp, "sandbox_proxy_wake_failures_total"))
        assert.are.equal(0, prom.value(exp, "sandbox_proxy_wakes_total"))
        assert.are.equal(0, prom.value(exp, "sandbox_proxy_wake_duration_seconds_count"))
    end)

    it("answers 503 with Retry-After at the deadline when the wake never completes", function()
        local api = K.start{}
        api:wake_config{ wake_never = true }
        api:put(suspended("carol", "stuck", up.port))
        local px = api:proxy{ config = wake_config{ max_wait = 1 } }
        local t0 = socket.gettime()
        local r = assert(px:request{ path = "/carol/stuck/echo", timeout = 20 })
        local took = socket.gettime() - t0
        assert.are.equal(503, r.status)
        assert.are.same({ error = "sandbox waking", path = "carol/stuck" }, cjson.decode(r.body))
        assert.is_truthy(r.headers["retry-after"])
        assert.is_true(took >= 0.9, "answered after " .. took .. " s, before the deadline")
    end)

    it("refuses a request past the per-sandbox limit without holding it, and frees the slot of a "
        .. "client that leaves", function()
        local api = K.start{}
        api:wake_config{ wake_never = true }
        api:put(suspended("dave", "full", up.port))
        local px = api:proxy{ config = wake_config{ max_wait = 10, max_held_per_sandbox = 2 } }
        local held = {}
        for i = 1, 2 do
            held[i] = assert(px:connect{ timeout = 20 })
            assert(held[i]:send_raw("GET /dave/full/echo HTTP/1.1\r\nHost: x\r\n\r\n"))
        end
        -- the third is refused while the first two are still held (so not at their deadline)
        H.net.wait_until(function()
            local r = px:get("/dave/full/echo")
            return r and r.status == 503 and cjson.decode(r.body).error == "sandbox waking" and r
        end, 5)
        for i = 1, 2 do
            assert.is_nil(held[i]:read_response{ timeout = 0.05 }, "held request " .. i
                .. " was answered")
        end
        -- a held client leaves: its slot is free again
        held[1]:close()
        local c = assert(px:connect{ timeout = 20 })
        H.net.wait_until(function()
            -- a fresh request is held (no answer within 0.3 s) rather than refused
            if not px.proc:alive() then
                error("the proxy exited: " .. px:stderr():sub(-2000), 0)
            end
            local probe = assert(px:connect{ timeout = 5 })
            assert(probe:send_raw("GET /dave/full/echo HTTP/1.1\r\nHost: x\r\n\r\n"))
            local r = probe:read_response{ timeout = 0.3 }
            probe:close()
            return r == nil
        end, 5)
        c:close()
        held[2]:close()
    end)

    it("never wakes a sandbox whose reason is terminal", function()
        local api = K.start{}
        api:put(H.sandbox("erin", "failed", up.port, { ready = false, reason = "PodFailed" }))
        api:put(H.sandbox("erin", "expired", up.port, { ready = false, reason = "SandboxExpired" }))
        local px = api:proxy{ config = wake_config() }
        for _, name in ipairs({ "failed", "expired" }) do
            local r = assert(px:get("/erin/" .. name .. "/echo"))
            assert.are.equal(503, r.status)
            assert.are.equal(name == "failed" and "PodFailed" or "SandboxExpired",
                cjson.decode(r.body).reason)
            assert.are.equal(0, patches(api, name))
        end
    end)

    it("answers 503 for a sandbox starting on its own by default (nobody woke it)", function()
        local api = K.start{}
        api:put(H.sandbox("fay", "fresh", up.port, { ready = false }))
        local px = api:proxy{ config = wake_config() }
        local r = assert(px:get("/fay/fresh/echo"))
        assert.are.equal(503, r.status)
        assert.are.equal("DependenciesNotReady", cjson.decode(r.body).reason)
        assert.are.equal(0, patches(api, "fresh"))
    end)

    it("with wait_starting, holds a request for a sandbox starting on its own until ready", function()
        local api = K.start{}
        api:put(H.sandbox("frank", "booting", up.port, { ready = false }))
        local px = api:proxy{ config = wake_config{ wait_starting = true } }
        local before = up.stats().requests
        local c = assert(px:connect{ timeout = 20 })
        assert(c:send_raw("GET /frank/booting/echo HTTP/1.1\r\nHost: x\r\n\r\n"))
        socket.sleep(0.3) -- an observation window: the request must be held, not answered
        assert.are.equal(before + 1, up.stats().requests) -- (the stats call itself)
        api:put(H.sandbox("frank", "booting", up.port))
        local r = assert(c:read_response{ timeout = 20 })
        assert.are.equal(200, r.status)
        assert.are.equal(0, patches(api, "booting"))
        c:close()
    end)

    it("wakes a v1alpha1 sandbox with replicas: 1", function()
        local api = K.start{ versions = "v1alpha1" }
        api:wake_config{ start_delay_ms = 200, wake_delay_ms = 200, wake_pod_ip = "127.0.0.1" }
        local obj = suspended("gina", "old", up.port)
        obj.apiVersion = "agents.x-k8s.io/v1alpha1"
        obj.spec = { replicas = 0 }
        api:put(obj)
        local px = api:proxy{ config = wake_config() }
        local r = assert(px:request{ path = "/gina/old/echo", timeout = 20 })
        assert.are.equal(200, r.status)
        local stored = api:call("GET", "/objects/default/old")
        assert.are.equal(1, stored.spec.replicas)
        assert.are.equal(1, patches(api, "old"))
    end)
end)

describe("idle suspend", function()
    local up

    setup(function()
        up = H.upstream{ name = "idle" }
    end)

    teardown(function()
        H.stop_all()
    end)

    local function idle_sandbox(user, name, timeout)
        local obj = H.sandbox(user, name, up.port)
        obj.metadata.annotations["sandbox-proxy.dev/idle-timeout"] = timeout
        return obj
    end

    -- The activity Leases the stand-in holds, and the writes (create + update) of replica r.
    local function leases(api)
        return api:call("GET", "/leases").items
    end

    local function lease_writes(api, r)
        local n = 0
        for name, c in pairs(api:call("GET", "/leases").stats.writes_by_name) do
            if name:match("^sandbox%-proxy%-activity%-" .. r .. "%-%d+$") then
                n = n + c
            end
        end
        return n
    end

    local function mode_of(api, name)
        return api:call("GET", "/objects/default/" .. name).spec.operatingMode
    end

    -- Gives the sandbox (put earlier at port 1, without an idle timeout, so that nothing is
    -- suspended while the replicas start) its idle timeout and the upstream's port; returns
    -- once every replica routes it so (its idle clock starts then).
    local function arm_idle(api, pxs, user, name, timeout)
        api:put(idle_sandbox(user, name, timeout))
        H.net.wait_until(function()
            for _, px in ipairs(pxs) do
                if view(px, name).port ~= up.port then
                    return false
                end
            end
            return true
        end, 15, 0.02, "every replica to see the idle timeout of " .. name)
    end

    -- What replica r's Lease says of sandbox key: "open", "served" (in "a" only) or nil.
    local function reported(api, r, key)
        local state
        for _, l in ipairs(leases(api)) do
            if l.spec.holderIdentity == r then
                local doc = cjson.decode(l.metadata.annotations["sandbox-proxy.dev/activity"])
                for _, k in ipairs(doc.o or {}) do
                    if k == key then
                        return "open"
                    end
                end
                if (doc.a or {})[key] then
                    state = "served"
                end
            end
        end
        return state
    end

    -- The replicas' log lines about suspends, wakes and Leases (pxs: name -> proxy), one text
    -- to attach to a failure.
    local function story(pxs)
        local lines = {}
        for r, px in pairs(pxs) do
            for _, l in ipairs(px:log_lines()) do
                if l.msg:find("suspend") or l.msg:find("wak") or l.msg:find("lease") then
                    lines[#lines + 1] = r .. ": " .. cjson.encode(l)
                end
            end
        end
        return table.concat(lines, "\n")
    end

    -- Fails if the sandbox is not Running (the replicas' story attached).
    local function assert_running(api, name, pxs, level)
        local mode = mode_of(api, name)
        if mode ~= "Running" then
            error(name .. " is " .. tostring(mode) .. ":\n" .. story(pxs), (level or 1) + 1)
        end
    end

    -- Fails at once if the sandbox leaves Running within `seconds`.
    local function stays_running(api, name, seconds, pxs)
        local until_t = socket.gettime() + seconds
        while socket.gettime() < until_t do
            assert_running(api, name, pxs, 2)
            socket.sleep(0.1) -- observing over time is the point of these tests
        end
    end

    it("suspends a sandbox after its idle timeout", function()
        local api = K.start{}
        api:put(idle_sandbox("hank", "nap", "2s"))
        local px = api:proxy{ config = wake_config() }
        assert.are.equal(200, assert(px:get("/hank/nap/echo")).status)
        assert.are.equal("Running", mode_of(api, "nap"))
        H.net.wait_until(function() return mode_of(api, "nap") == "Suspended" end, 15)
        px:wait_log(function(l) return l.msg == "suspended an idle sandbox" end)
    end)

    it("does not suspend while a WebSocket tunnel is open, then does once it closes", function()
        local api = K.start{}
        api:put(idle_sandbox("ivy", "chat", "1s"))
        local px = api:proxy{ config = wake_config() }
        local c = assert(ws.connect{ host = "127.0.0.1", port = px.port, path = "/ivy/chat/ws" })
        local until_t = socket.gettime() + 3
        while socket.gettime() < until_t do
            assert.are.equal("Running", mode_of(api, "chat"))
            socket.sleep(0.2) -- observing over time is the point of this test
        end
        c:close()
        H.net.wait_until(function() return mode_of(api, "chat") == "Suspended" end, 15)
    end)

    it("is decided through the API server: two replicas suspend once, only when both are idle", function()
        local api = K.start{}
        api:put(H.sandbox("jo", "shared", 1))
        local a = api:proxy{ config = wake_config{ replica = "a" } }
        local b = api:proxy{ config = wake_config{ replica = "b" } }
        -- 4 s of idle timeout against a's activity reports every 0.5 s: a margin that a loaded
        -- machine (a sanitizer build next to other suites) does not eat up
        arm_idle(api, { a, b }, "jo", "shared", "4s")
        -- replica a keeps the sandbox busy for longer than the timeout; replica b sees no traffic
        local busy_until = socket.gettime() + 6
        while socket.gettime() < busy_until do
            assert.are.equal(200, assert(a:get("/jo/shared/echo")).status)
            assert_running(api, "shared", { a = a, b = b })
            socket.sleep(0.25) -- the traffic pattern under test
        end
        H.net.wait_until(function() return mode_of(api, "shared") == "Suspended" end, 15)
        -- suspends logged by both replicas together
        local function suspends()
            local n = 0
            for _, px in ipairs({ a, b }) do
                for _, l in ipairs(px:log_lines()) do
                    if l.msg == "suspended an idle sandbox" then
                        n = n + 1
                    end
                end
            end
            return n
        end
        -- give the slower replica time to try too, then count
        H.net.wait_until(function()
            return suspends() >= 1
        end, 5)
        socket.sleep(1.5) -- a window in which a second suspend would show up
        assert.are.equal(1, suspends(), story({ a = a, b = b }))
        -- the activity went through the Leases: the one PATCH of the sandbox is the suspend
        assert.are.equal(1, patches(api, "shared"))
        assert.is_true(lease_writes(api, "a") >= 1)
    end)

    it("keeps every replica from suspending while one has a tunnel open (reported open until "
        .. "its Lease expires)", function()
        local api = K.start{}
        api:put(H.sandbox("kay", "tun", 1))
        -- a renews rarely (every 3 s): between renewals only the "open" mark keeps b waiting
        local a = api:proxy{ config = wake_config{ replica = "a", activity_interval = 3,
            lease_duration = 9 } }
        local b = api:proxy{ config = wake_config{ replica = "b" } }
        arm_idle(api, { a, b }, "kay", "tun", "1s")
        local c = assert(ws.connect{ host = "127.0.0.1", port = a.port, path = "/kay/tun/ws" })
        H.net.wait_until(function()
            for _, l in ipairs(leases(api)) do
                local doc = cjson.decode(l.metadata.annotations["sandbox-proxy.dev/activity"])
                if l.spec.holderIdentity == "a" and #(doc.o or {}) == 1 then
                    return true
                end
            end
        end, 15, 0.05, "replica a to report the tunnel open")
        stays_running(api, "tun", 4, { a = a, b = b })
        c:close()
        H.net.wait_until(function() return mode_of(api, "tun") == "Suspended" end, 30)
        assert.is_truthy(b) -- b ran throughout (teardown checks that it is alive)
    end)

    it("never suspends a sandbox that a tunnel on another replica woke, through several idle "
        .. "periods (the wake is activity on every replica)", function()
        local api = K.start{}
        api:put(idle_sandbox("kit", "woke", "1s"))
        -- a long lease_duration: a slow replica's open tunnel stays trusted between renewals
        local a = api:proxy{ config = wake_config{ replica = "a", lease_duration = 6 } }
        local b = api:proxy{ config = wake_config{ replica = "b", lease_duration = 6 } }
        -- suspended (and seen so by a, which then wakes it rather than forwarding at once)
        local function asleep()
            return mode_of(api, "woke") == "Suspended" and view(a, "woke").ready == false
        end
        -- nobody serves it: suspended after 1 s (both replicas have it on their idle clocks)
        H.net.wait_until(asleep, 30)
        for round = 1, 2 do
            -- the tunnel's request wakes it through a and is held until it is ready
            local c = assert(ws.connect{ host = "127.0.0.1", port = a.port, path = "/kit/woke/ws",
                timeout = 30 })
            finally(function() c:close() end)
            stays_running(api, "woke", 3, { a = a, b = b })
            c:close()
            H.net.wait_until(asleep, 30, 0.1,
                "the sandbox to be suspended after the tunnel closed (round " .. round .. ")")
        end
    end)

    it("never suspends while another replica has a tunnel open that it opened right after "
        .. "serving a request (an open tunnel is published at once, not at the next renewal)",
        function()
        local api = K.start{}
        -- port 1 and no idle timeout while the replicas start (nothing to suspend yet)
        for i = 1, 3 do
            api:put(H.sandbox("kim", "chat" .. i, 1))
        end
        -- a renews once at its start, then not within this test (every 30 s): only what it
        -- flushes reaches the other replica
        local a = api:proxy{ config = wake_config{ replica = "a", activity_interval = 30,
            lease_duration = 90 } }
        local b = api:proxy{ config = wake_config{ replica = "b" } }
        -- a sandbox a has served and reported as served, never as open (a request caught in
        -- flight by a write is reported open, and the other replica then trusts that report
        -- until the Lease expires: such a sandbox could not show the race; try the next one)
        local name
        for i = 1, 3 do
            local n = "chat" .. i
            arm_idle(api, { a, b }, "kim", n, "1s")
            assert.are.equal(200, assert(a:get("/kim/" .. n .. "/echo")).status)
            local state
            H.net.wait_until(function()
                state = reported(api, "a", "kim/" .. n)
                return state
            end, 15, 0.02, "replica a to publish the request it served")
            if state == "served" and mode_of(api, n) == "Running" then
                name = n
                break
            end
        end
        assert.is_truthy(name, "no sandbox was reported served only (see the comment above)")
        local c = assert(ws.connect{ host = "127.0.0.1", port = a.port,
            path = "/kim/" .. name .. "/ws" })
        finally(function() c:close() end)
        stays_running(api, name, 4, { a = a, b = b })
        assert.are.equal("open", reported(api, "a", "kim/" .. name))
        c:close()
    end)

    it("decides on the API server's Leases, not on a Lease watch that lags behind (another "
        .. "replica's open tunnel, reported before the timeout, arrives by the watch after it)",
        function()
        local api = K.start{}
        api:put(H.sandbox("lee", "lag", 1))
        local a = api:proxy{ config = wake_config{ replica = "a" } }
        local b = api:proxy{ config = wake_config{ replica = "b" } }
        -- every Lease watch delivers each write 5 s late from now on (LIST and GET stay current)
        api:call("POST", "/leases/watch-delay", { seconds = 5 })
        arm_idle(api, { a, b }, "lee", "lag", "2s")
        local c = assert(ws.connect{ host = "127.0.0.1", port = a.port, path = "/lee/lag/ws" })
        finally(function() c:close() end)
        H.net.wait_until(function() return reported(api, "a", "lee/lag") == "open" end, 15,
            0.02, "replica a to report the tunnel open")
        stays_running(api, "lag", 4, { a = a, b = b })
        c:close()
        H.net.wait_until(function() return mode_of(api, "lag") == "Suspended" end, 30)
    end)

    it("stops counting a replica that stops renewing its Lease", function()
        local api = K.start{}
        api:put(H.sandbox("lou", "gone", 1))
        local a = api:proxy{ config = wake_config{ replica = "a", lease_duration = 2 } }
        local b = api:proxy{ config = wake_config{ replica = "b" } }
        arm_idle(api, { a, b }, "lou", "gone", "1s")
        local c = assert(ws.connect{ host = "127.0.0.1", port = a.port, path = "/lou/gone/ws" })
        H.net.wait_until(function()
            for _, l in ipairs(leases(api)) do
                local doc = cjson.decode(l.metadata.annotations["sandbox-proxy.dev/activity"])
                if l.spec.holderIdentity == "a" and #(doc.o or {}) == 1 then
                    return true
                end
            end
        end, 15, 0.05, "replica a to report the tunnel open")
        -- a vanishes with the tunnel open (no clean close, no last write)
        a.proc.signalled = true
        a.proc:kill()
        c:close()
        -- b suspends once a's Lease has expired (2 s) and the idle timeout (1 s) has passed
        H.net.wait_until(function() return mode_of(api, "gone") == "Suspended" end, 30)
        b:wait_log(function(l) return l.msg == "suspended an idle sandbox" end)
    end)

    it("writes Leases per replica and interval, not per sandbox (50 active sandboxes, 3 "
        .. "replicas)", function()
        local api = K.start{}
        local names = {}
        for i = 1, 50 do
            names[i] = "busy" .. i
            api:put(idle_sandbox("mia", names[i], "60s"))
        end
        local pxs = {}
        for i, r in ipairs({ "a", "b", "c" }) do
            pxs[i] = api:proxy{ config = wake_config{ replica = r } }
        end
        api:call("POST", "/leases/reset-stats")
        local t0 = socket.gettime()
        -- every replica serves every sandbox, for about 3 s (bounded: 20 rounds)
        for _ = 1, 20 do
            for _, px in ipairs(pxs) do
                for _, n in ipairs(names) do
                    assert.are.equal(200, assert(px:get("/mia/" .. n .. "/echo")).status)
                end
            end
            if socket.gettime() - t0 > 3 then
                break
            end
        end
        -- every replica reports all 50 (once its next write is in)
        H.net.wait_until(function()
            local seen = {}
            for _, l in ipairs(leases(api)) do
                local doc = cjson.decode(l.metadata.annotations["sandbox-proxy.dev/activity"])
                for k in pairs(doc.a or {}) do
                    seen[l.spec.holderIdentity .. " " .. k] = true
                end
            end
            local n = 0
            for _ in pairs(seen) do
                n = n + 1
            end
            return n == 150
        end, 15, 0.1, "every replica to report every sandbox")
        local elapsed = socket.gettime() - t0
        local writes = 0
        for _, r in ipairs({ "a", "b", "c" }) do
            writes = writes + lease_writes(api, r)
        end
        -- at most one write per activity_flush (0.25 s) per replica, plus one in flight each;
        -- per sandbox it would be 50 x 3 per activity_interval
        local bound = 3 * (math.ceil(elapsed / 0.25) + 1)
        assert.is_true(writes <= bound, writes .. " Lease writes in " .. elapsed .. " s (bound "
            .. bound .. ")")
        for _, n in ipairs(names) do
            assert.are.equal(0, patches(api, n)) -- no activity PATCH on the sandboxes
        end
    end)
end)

-- The RBAC idle suspend needs (k8s/overlays/wake/rbac-wake.yaml): a namespaced Role on the activity Leases,
-- with every verb wake.lua uses, bound to the proxy's ServiceAccount in its own namespace.
describe("the wake RBAC", function()
    it("grants the verbs the activity Leases need, in the proxy's namespace", function()
        local process = require "spec.helpers.process"
        local kubeconn = require "sp.kubeconn"
        local text = assert(process.read_file(H.SOURCE_DIR .. "/k8s/overlays/wake/rbac-wake.yaml"))
        local docs = {}
        for chunk in (text .. "\n---\n"):gmatch("(.-)\n%-%-%-[^\n]*\n") do
            if chunk:gsub("#[^\n]*", ""):match("%S") then
                docs[#docs + 1] = assert(kubeconn.parse_yaml(chunk))
            end
        end
        local role, binding
        for _, d in ipairs(docs) do
            role = d.kind == "Role" and d or role
            binding = d.kind == "RoleBinding" and d or binding
        end
        assert.is_truthy(role, "no Role in k8s/overlays/wake/rbac-wake.yaml")
        assert.are.equal("agent-sandbox-system", role.metadata.namespace)
        local verbs = {}
        for _, rule in ipairs(role.rules) do
            if rule.apiGroups[1] == "coordination.k8s.io" and rule.resources[1] == "leases" then
                for _, v in ipairs(rule.verbs) do
                    verbs[v] = true
                end
            end
        end
        -- what scripts/wake.lua sends: POST, PUT, GET (after a 409), LIST + WATCH, DELETE
        for _, v in ipairs({ "create", "update", "get", "list", "watch", "delete" }) do
            assert.is_true(verbs[v] == true, "the Role lacks " .. v .. " on leases")
        end
        assert.are.equal(role.metadata.name, binding.roleRef.name)
        assert.are.equal("Role", binding.roleRef.kind)
        assert.are.equal("sandbox-router", binding.subjects[1].name)
        assert.are.equal(role.metadata.namespace, binding.subjects[1].namespace)
    end)
end)
