-- wake.lua's decisions, over the real route table and the real "wake" shared dict, with the
-- runtime's task functions (core.in_task / wait / monotonic / post), the Kubernetes client and
-- the log replaced by recording stubs: what is held and what is not (suspended, woken by this
-- proxy, being woken by another replica, starting on its own, terminal), the marks
-- route_changed keeps, one PATCH per wake, the hold deadline, max_held_per_sandbox, a client
-- that leaves, and a refused or failed PATCH (403/404/409/5xx/no answer) answered 503 with one
-- log line. A held request's wait is simulated: each core.wait runs the next step of a script
-- (a route change, another request, worker 0's PATCH) and advances a fake clock.
local testkit = require "sp.testkit"
local shared = require "sp.shared"
local routes = require "sp.routes"
local core = require "sp.core"
local k8s = require "sp.k8s"
local log = require "sp.log"

local dict = assert(shared.dict("wake"))
local sp_dict = assert(shared.dict("sp"))

local KEY = "alice/sb"

local function load(section)
    return testkit.load("wake", "wake", section)
end

-- Sets the one route KEY: state is "suspended" (spec Suspended, status SandboxSuspended),
-- "accepted" (spec Running, status still SandboxSuspended), "starting" (spec Running,
-- DependenciesNotReady), "ready", or a terminal reason.
local function set_route(state)
    local r = { address = "10.0.0.7", port = 8888, ready = false, mode = "Running" }
    if state == "suspended" then
        r.mode, r.reason, r.address = "Suspended", "SandboxSuspended", nil
    elseif state == "accepted" then
        r.reason, r.address = "SandboxSuspended", nil
    elseif state == "starting" then
        r.reason, r.address = "DependenciesNotReady", nil
    elseif state == "ready" then
        r.ready, r.reason = true, "DependenciesReady"
    else
        r.reason, r.address = state, nil
    end
    testkit.set_routes{ [KEY] = r }
    return routes.get(KEY)
end

-- Stubs (restored after each test) -------------------------------------------------------

local saved = {}
local function stub(tbl, name, fn)
    saved[#saved + 1] = { tbl, name, tbl[name] }
    tbl[name] = fn
end

local clock, posts, waits, logs, steps

-- Installs the task stubs: core.wait runs steps[n] (if any) for the n-th wait, then returns
-- what it returns (default true), advancing the clock by the wait's timeout when the step
-- returns "timeout".
local function tasks()
    clock, posts, waits = 1000, {}, 0
    stub(core, "in_task", function() return true end)
    stub(core, "monotonic", function() return clock end)
    stub(core, "post", function(worker, channel, data)
        posts[#posts + 1] = { worker = worker, channel = channel, data = data }
        return 1
    end)
    stub(core, "wait", function(token, timeout)
        waits = waits + 1
        assert(waits <= 200, "unbounded waiting")
        assert.are.equal("route:" .. KEY, token)
        local step = steps[waits]
        local a, b = true, nil
        if step then
            a, b = step()
        end
        if a == "timeout" then
            clock = clock + timeout
            return nil, "ETIMEDOUT: timed out"
        end
        return a, b
    end)
end

local function capture_logs()
    logs = {}
    for _, level in ipairs({ "info", "warn", "error" }) do
        stub(log, level, function(msg, fields)
            logs[#logs + 1] = { level = level, msg = msg, fields = fields or {} }
        end)
    end
end

local function wake_posts()
    local n = 0
    for _, p in ipairs(posts) do
        if p.channel == "wake" then
            assert.are.equal(0, p.worker)
            assert.are.equal(KEY, p.data)
            n = n + 1
        end
    end
    return n
end

local function forward(req, r)
    req:forward(r.address, r.port, "/x")
end

local function request()
    return testkit.request{ target = "/alice/sb/x" }
end

describe("wake.lua", function()
    before_each(function()
        dict:flush_all()
        steps = {}
        capture_logs()
    end)

    after_each(function()
        for i = #saved, 1, -1 do
            local s = saved[i]
            s[1][s[2]] = s[3]
        end
        saved = {}
        testkit.clear_routes()
        dict:flush_all()
    end)

    describe("decide", function()
        it("holds nothing with the defaults (wake off)", function()
            local w = load(nil)
            for _, state in ipairs({ "suspended", "accepted", "starting", "ready" }) do
                assert.is_nil(w.decide(set_route(state)), state)
            end
        end)

        it("wakes a suspended sandbox and holds one whose PATCH is taking effect", function()
            local w = load{ enabled = true }
            assert.are.equal("wake", w.decide(set_route("suspended")))
            -- spec Running, status still suspended: someone's PATCH is landing; no new PATCH
            assert.are.equal("hold", w.decide(set_route("accepted")))
            assert.is_nil(w.decide(set_route("ready")))
        end)

        it("holds a starting sandbox only while a wake is under way, unless wait_starting", function()
            local w = load{ enabled = true }
            local r = set_route("starting")
            assert.is_nil(w.decide(r)) -- starting on its own (just created): not held
            dict:set("waking:" .. KEY, true, 60)
            assert.are.equal("hold", w.decide(r)) -- woken: held through the pod's start
            dict:delete("waking:" .. KEY)
            assert.are.equal("hold", load{ enabled = true, wait_starting = true }.decide(r))
            assert.are.equal("hold", load{ wait_starting = true }.decide(r))
        end)

        it("never holds or wakes a terminal reason", function()
            local w = load{ enabled = true, wait_starting = true }
            for _, reason in ipairs({ "PodFailed", "SandboxExpired", "PodSucceeded" }) do
                dict:set("waking:" .. KEY, true, 60)
                assert.is_nil(w.decide(set_route(reason)), reason)
            end
        end)
    end)

    describe("route_changed", function()
        before_each(function()
            tasks()
        end)

        it("marks a wake seen through the watch (another replica's PATCH), whatever the order",
            function()
            local w = load{ enabled = true }
            set_route("suspended")
            w.route_changed(KEY)
            assert.is_nil(dict:get("waking:" .. KEY))
            -- the watch skipped the accepted state (a relist): suspended -> starting
            set_route("starting")
            w.route_changed(KEY)
            assert.is_true(dict:get("waking:" .. KEY))
            assert.are.equal("hold", w.decide(routes.get(KEY)))
            set_route("ready")
            w.route_changed(KEY)
            assert.is_nil(dict:get("waking:" .. KEY))
        end)

        it("marks a sandbox whose spec says running while its status says suspended", function()
            local w = load{ enabled = true }
            set_route("accepted")
            w.route_changed(KEY)
            assert.is_true(dict:get("waking:" .. KEY))
        end)

        it("does not mark a sandbox that starts without having been suspended", function()
            local w = load{ enabled = true }
            set_route("starting")
            w.route_changed(KEY)
            assert.is_nil(dict:get("waking:" .. KEY))
            assert.is_nil(w.decide(routes.get(KEY)))
        end)

        it("keeps a PATCH claim until the watch shows the new spec, then drops it", function()
            local w = load{ enabled = true }
            dict:set("patching:" .. KEY, true, 60)
            set_route("suspended")
            w.route_changed(KEY) -- e.g. an unrelated change while the PATCH is in flight
            assert.is_true(dict:get("patching:" .. KEY))
            set_route("accepted")
            w.route_changed(KEY)
            assert.is_nil(dict:get("patching:" .. KEY))
        end)

        it("keeps no marks when waking is off", function()
            local w = load{ wait_starting = true }
            set_route("accepted")
            w.route_changed(KEY)
            assert.is_nil(dict:get("waking:" .. KEY))
        end)

        it("drops the marks when the sandbox is deleted, and signals held requests", function()
            local w = load{ enabled = true }
            dict:set("waking:" .. KEY, true, 60)
            dict:set("held:" .. KEY, 1)
            testkit.clear_routes()
            w.route_changed(KEY)
            assert.is_nil(dict:get("waking:" .. KEY))
            assert.are.same({ worker = -1, channel = "route", data = KEY }, posts[1])
        end)
    end)

    describe("handle", function()
        before_each(function()
            tasks()
        end)

        it("passes on requests it does not hold (the caller answers 503)", function()
            local w = load{ enabled = true }
            local req = request()
            assert.is_false(w.handle(req, set_route("starting"), forward))
            assert.are.equal("none", req:decision())
            assert.are.equal(0, waits)
        end)

        it("sends one PATCH for a crowd and holds every request through the whole start", function()
            local w = load{ enabled = true }
            local r = set_route("suspended")
            local a, b, c, d = request(), request(), request(), request()
            steps = {
                function() -- a is held; b arrives while the PATCH is in flight
                    assert.is_true(w.handle(b, routes.get(KEY), forward))
                end,
                function() -- b's wait: the PATCH lands, the status still says suspended
                    set_route("accepted")
                    w.route_changed(KEY)
                    assert.is_true(w.handle(c, routes.get(KEY), forward))
                end,
                function() -- c's wait: the pod is starting
                    set_route("starting")
                    w.route_changed(KEY)
                    assert.is_true(w.handle(d, routes.get(KEY), forward))
                end,
                function() -- d's wait: ready
                    set_route("ready")
                    w.route_changed(KEY)
                end,
            }
            assert.is_true(w.handle(a, r, forward))
            for _, req in ipairs({ a, b, c, d }) do
                assert.are.equal("forward", req:decision())
                assert.are.equal("10.0.0.7", req.forwarded.host)
            end
            assert.are.equal(1, wake_posts())
            assert.are.equal(4, waits)
        end)

        it("does not PATCH for a sandbox another replica is waking", function()
            local w = load{ enabled = true }
            local req = request()
            steps = { function()
                set_route("ready")
            end }
            assert.is_true(w.handle(req, set_route("accepted"), forward))
            assert.are.equal("forward", req:decision())
            assert.are.equal(0, wake_posts())
        end)

        it("answers 503 sandbox waking at the deadline (max_wait)", function()
            local w = load{ enabled = true, max_wait = 7 }
            local req = request()
            for i = 1, 10 do
                steps[i] = function() return "timeout" end
            end
            local t0 = clock
            assert.is_true(w.handle(req, set_route("suspended"), forward))
            assert.are.equal(503, req.response.status)
            assert.are.same({ error = "sandbox waking", path = KEY }, req.response.json)
            assert.are.equal("5", req.response.headers["Retry-After"])
            assert.are.equal(7, clock - t0) -- woken every 2 s, answered at the deadline
            assert.are.equal(4, waits)
            assert.are.equal(1, wake_posts())
        end)

        it("refuses a request past max_held_per_sandbox without holding it", function()
            local w = load{ enabled = true, max_held_per_sandbox = 1 }
            local a, b = request(), request()
            steps = {
                function()
                    assert.is_true(w.handle(b, routes.get(KEY), forward))
                    assert.are.equal(503, b.response.status)
                    assert.are.equal("sandbox waking", b.response.json.error)
                    set_route("ready")
                end,
            }
            assert.is_true(w.handle(a, set_route("suspended"), forward))
            assert.are.equal("forward", a:decision())
            assert.are.equal(1, waits) -- b never waited
            a:complete()
            b:complete()
            assert.are.equal(0, dict:get("held:" .. KEY))
        end)

        it("releases a client that leaves, answering nothing", function()
            local w = load{ enabled = true }
            local req = request()
            steps = { function() return nil, "ECONNRESET: the client went away" end }
            assert.is_true(w.handle(req, set_route("suspended"), forward))
            assert.are.equal("none", req:decision())
        end)

        it("lets the caller answer when the sandbox fails or is deleted while held", function()
            local w = load{ enabled = true }
            local req = request()
            steps = { function() set_route("PodFailed") end }
            assert.is_false(w.handle(req, set_route("suspended"), forward))
            req = request()
            steps = {}
            waits = 0
            steps[1] = function() testkit.clear_routes() end
            assert.is_false(w.handle(req, set_route("accepted"), forward))
        end)
    end)

    describe("patch_running (worker 0)", function()
        local calls

        before_each(function()
            tasks()
            calls = {}
        end)

        local function api_answers(status, body)
            stub(k8s, "request", function(opts)
                calls[#calls + 1] = opts
                if status == nil then
                    return nil, body
                end
                return status, body
            end)
        end

        it("PATCHes the spec to Running, keeps the claim and counts the wake", function()
            local w = load{ enabled = true }
            api_answers(200, "{}")
            set_route("suspended")
            dict:set("patching:" .. KEY, true, 60)
            local before = sp_dict:get("m:wakes") or 0
            w.patch_running(KEY)
            assert.are.equal(1, #calls)
            assert.are.equal("PATCH", calls[1].method)
            assert.are.equal("/apis/agents.x-k8s.io/v1beta1/namespaces/default/sandboxes/sb",
                calls[1].path)
            assert.are.equal('{"spec":{"operatingMode":"Running"}}', calls[1].body)
            assert.are.equal("application/merge-patch+json", calls[1].content_type)
            assert.is_true(dict:get("patching:" .. KEY)) -- until the watch shows it
            assert.are.equal(before + 1, sp_dict:get("m:wakes"))
            assert.are.equal("woke a suspended sandbox", logs[1].msg)
        end)

        it("does not PATCH a sandbox that is no longer suspended", function()
            local w = load{ enabled = true }
            api_answers(200, "{}")
            set_route("accepted")
            w.patch_running(KEY)
            assert.are.equal(0, #calls)
        end)

        local cases = {
            { 403, '{"kind":"Status","message":"sandboxes is forbidden","code":403}', "rbac-wake" },
            { 404, '{"kind":"Status","message":"not found","code":404}', "gone" },
            { 409, '{"kind":"Status","message":"conflict","code":409}', "changed" },
            { 500, '{"kind":"Status","message":"etcd down","code":500}', "API server failed" },
            { nil, "ECONNREFUSED: connection refused", "no answer" },
        }
        for _, case in ipairs(cases) do
            local status, body, hint = case[1], case[2], case[3]
            it("answers the held requests 503 with the status when the PATCH gets "
                .. tostring(status or "no answer") .. ", with one log line", function()
                local w = load{ enabled = true }
                api_answers(status, body)
                local held, later = request(), request()
                steps = { function()
                    w.patch_running(KEY) -- worker 0, while the request is held
                end }
                assert.is_true(w.handle(held, set_route("suspended"), forward))
                assert.are.equal(1, wake_posts())
                assert.are.equal(503, held.response.status)
                assert.are.same({ error = "sandbox wake failed", path = KEY,
                    status = status or 0 }, held.response.json)
                assert.are.equal("5", held.response.headers["Retry-After"])
                -- one log line, with the status and a hint
                local errors = {}
                for _, l in ipairs(logs) do
                    if l.level == "error" then
                        errors[#errors + 1] = l
                    end
                end
                assert.are.equal(1, #errors)
                assert.are.equal("cannot wake the sandbox", errors[1].msg)
                assert.are.equal(status or 0, errors[1].fields.status)
                assert.is_truthy(tostring(errors[1].fields.hint):find(hint, 1, true))
                -- the failure is answered at once for retry_after seconds, without a new PATCH
                assert.is_nil(dict:get("patching:" .. KEY))
                assert.is_true(w.handle(later, routes.get(KEY), forward))
                assert.are.equal(503, later.response.status)
                assert.are.equal("sandbox wake failed", later.response.json.error)
                assert.are.equal(1, wake_posts())
                assert.are.equal(1, #calls)
            end)
        end
    end)
end)

describe("wake.activity through a claim's alias", function()
    it("records activity under the sandbox's own key, which the idle check reads", function()
        local w = testkit.load("wake", "wake", { enabled = true })
        dict:flush_all()
        local req = testkit.request{ target = "/alice/my-claim/x" }
        -- the alias route of claim my-claim, bound to the warm-pool sandbox pool-x2k4d
        w.activity(req, { key = "alice/my-claim", alias_of = "alice/pool-x2k4d",
            idle_timeout = "60", namespace = "default", name = "pool-x2k4d" })
        assert.is_truthy(dict:get("act:alice/pool-x2k4d"))
        assert.is_nil(dict:get("act:alice/my-claim"))
        assert.are.equal(1, dict:get("inflight:alice/pool-x2k4d"))
        dict:flush_all()
    end)
end)
