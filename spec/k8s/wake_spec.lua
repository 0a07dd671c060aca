-- Wake on request and idle suspend, against the Kubernetes API stand-in: a suspended sandbox
-- woken by a request that then succeeds; 50 concurrent requests sharing one PATCH; a wake that
-- never completes (503 at the deadline); held-request limits; a client leaving while held;
-- terminal reasons never woken; starting sandboxes waited for; v1alpha1; idle suspend after
-- the timeout and never with a tunnel open; two replicas suspending once, only when both idle.
local H = require "spec.helpers.proxy"
local K = require "spec.helpers.kube"
local ws = require "spec.helpers.ws"
local socket = require "socket"
local cjson = require "cjson"

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

local function wake_config(extra)
    return "return { wake = { enabled = true, wait_starting = true, max_wait = "
        .. (extra and extra.max_wait or 20) .. ", max_held_per_sandbox = "
        .. (extra and extra.max_held_per_sandbox or 100) .. ", check_interval = 0.2, "
        .. "activity_interval = 0.5 }, ratelimit = { enabled = false } }"
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
        api:wake_config{ wake_delay_ms = 300, wake_pod_ip = "127.0.0.1" }
        api:put(suspended("alice", "sleepy", up.port))
        local px = api:proxy{ config = wake_config() }
        assert.are.equal(false, px:json("/sandboxes").sandboxes[1].ready)
        local t0 = socket.gettime()
        local r = assert(px:request{ path = "/alice/sleepy/echo", timeout = 20 })
        assert.are.equal(200, r.status)
        assert.are.equal("woken", r.headers["x-upstream-name"])
        assert.is_true(socket.gettime() - t0 >= 0.3)
        assert.are.equal(1, patches(api, "sleepy"))
        -- once awake it is served directly
        assert.are.equal(200, assert(px:get("/alice/sleepy/echo")).status)
        assert.are.equal(1, patches(api, "sleepy"))
    end)

    it("shares one PATCH among 50 concurrent requests on two workers, and serves them all", function()
        local api = K.start{}
        api:wake_config{ wake_delay_ms = 500, wake_pod_ip = "127.0.0.1" }
        api:put(suspended("bob", "crowd", up.port))
        local px = api:proxy{ workers = 2, config = wake_config() }
        local conns = {}
        for i = 1, 50 do
            conns[i] = assert(px:connect{ timeout = 20 })
            assert(conns[i]:send_raw("GET /bob/crowd/echo HTTP/1.1\r\nHost: x\r\n\r\n"))
        end
        for i = 1, 50 do
            local r = assert(conns[i]:read_response{ timeout = 20 })
            assert.are.equal(200, r.status)
            conns[i]:close()
        end
        assert.are.equal(1, patches(api, "crowd"))
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
        assert.is_true(took >= 0.9 and took < 5, "answered after " .. took .. " s")
    end)

    it("limits the requests held per sandbox, and releases a client that leaves at once", function()
        local api = K.start{}
        api:wake_config{ wake_never = true }
        api:put(suspended("dave", "full", up.port))
        local px = api:proxy{ config = wake_config{ max_wait = 10, max_held_per_sandbox = 2 } }
        local held = {}
        for i = 1, 2 do
            held[i] = assert(px:connect{ timeout = 20 })
            assert(held[i]:send_raw("GET /dave/full/echo HTTP/1.1\r\nHost: x\r\n\r\n"))
        end
        -- the third is refused at once
        H.net.wait_until(function()
            local r = px:get("/dave/full/echo")
            return r and r.status == 503 and cjson.decode(r.body).error == "sandbox waking" and r
        end, 5)
        -- a held client leaves: its slot is free at once
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

    it("waits for a sandbox that is starting instead of answering 503 at once", function()
        local api = K.start{}
        api:put(H.sandbox("frank", "booting", up.port, { ready = false }))
        local px = api:proxy{ config = wake_config() }
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
        api:wake_config{ wake_delay_ms = 200, wake_pod_ip = "127.0.0.1" }
        local obj = suspended("gina", "old", up.port)
        obj.apiVersion = "agents.x-k8s.io/v1alpha1"
        obj.spec = { replicas = 0 }
        api:put(obj)
        local px = api:proxy{ config = wake_config() }
        local r = assert(px:request{ path = "/gina/old/echo", timeout = 20 })
        assert.are.equal(200, r.status)
        local stored = api:call("GET", "/objects/default/old")
        assert.are.equal(1, stored.spec.replicas)
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

    local function mode_of(api, name)
        return api:call("GET", "/objects/default/" .. name).spec.operatingMode
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
        api:put(idle_sandbox("jo", "shared", "2s"))
        local a = api:proxy{ config = wake_config() }
        local b = api:proxy{ config = wake_config() }
        -- replica a keeps the sandbox busy for a while; replica b sees no traffic at all
        local busy_until = socket.gettime() + 4
        while socket.gettime() < busy_until do
            assert.are.equal(200, assert(a:get("/jo/shared/echo")).status)
            assert.are.equal("Running", mode_of(api, "shared"))
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
        assert.are.equal(1, suspends())
    end)
end)
