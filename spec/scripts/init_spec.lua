-- init.lua: the entry point's dispatch (demo listener, the proxy's own endpoints, the router),
-- on_start and check(). Modules are the real ones; their handlers are spied where only the
-- dispatch itself is under test.
local testkit = require "sp.testkit"
local shared = require "sp.shared"
local core = require "sp.core"
local cjson = require "cjson"
local init = require "init"
local discovery = require "discovery"
local health = require "health"
local sandboxes = require "sandboxes"
local router = require "router"
local demo_sandbox = require "demo_sandbox"

local sp_dict = assert(shared.dict("sp"))

local function request(target, opts)
    opts = opts or {}
    opts.target = target
    local req = testkit.request(opts)
    init.on_request(req)
    return req
end

describe("init", function()
    before_each(function()
        discovery.reset()
        testkit.clear_routes()
        sp_dict:delete("source")
    end)

    after_each(function()
        discovery.reset()
        testkit.clear_routes()
        sp_dict:delete("source")
    end)

    describe("endpoints", function()
        it("are exactly the health, sandboxes and metrics endpoints, with their own handlers", function()
            local paths = {}
            for p in pairs(init.endpoints) do
                paths[#paths + 1] = p
            end
            table.sort(paths)
            assert.are.same({ "/health", "/healthz", "/live", "/metrics", "/ready", "/sandboxes" },
                paths)
            -- /metrics and /sandboxes are wrapped by auth; the probes are the scripts' own
            assert.are.equal(health.endpoints["/health"], init.endpoints["/health"])
            assert.are.equal(health.endpoints["/ready"], init.endpoints["/ready"])
            assert.are.equal(health.endpoints["/live"], init.endpoints["/live"])
            assert.are.equal(require("sandbox_headers").healthz, init.endpoints["/healthz"])
        end)

        it("answers GET /healthz with the agent-sandbox router's {\"status\":\"ok\"}, routing headers or not", function()
            for _, h in ipairs({ {}, { ["X-Sandbox-ID"] = "sb" } }) do
                local req = request("/healthz", { headers = h })
                assert.are.equal(200, req.response.status)
                assert.are.same({ status = "ok" }, req.response.json)
            end
        end)
    end)

    describe("on_request", function()
        it("sends the demo listener to the demo sandbox, whatever the path", function()
            testkit.set_routes{ ["alice/sb"] = { address = "10.0.0.7" } }
            local req = request("/", { listener = "demo" })
            assert.are.same({ status = "ok", message = "Sandbox Runtime is active." },
                req.response.json)
            req = request("/health", { listener = "demo" })
            assert.are.equal(404, req.response.status)
            assert.are.same({ message = "Not found" }, req.response.json)
            req = request("/alice/sb/x", { listener = "demo" })
            assert.are.equal(404, req.response.status)
            assert.is_nil(req.forwarded)
            req = request("/execute", { listener = "demo", method = "POST", body = "abc" })
            assert.are.equal(200, req.response.status)
            assert.matches("received 3 bytes", req.response.json.stdout)
        end)

        it("answers /health", function()
            local req = request("/health")
            assert.are.equal(200, req.response.status)
            assert.are.equal("ok", req.response.json.status)
        end)

        it("answers /health with a query string (exact path match)", function()
            local req = request("/health?verbose=1")
            assert.are.equal(200, req.response.status)
            assert.are.equal("ok", req.response.json.status)
        end)

        it("answers /ready and /live", function()
            assert.are.equal(503, request("/ready").response.status)
            sp_dict:set("source", cjson.encode({ synced = true }))
            assert.are.same({ ready = true }, request("/ready").response.json)
            assert.are.same({ live = true }, request("/live").response.json)
        end)

        it("answers /sandboxes", function()
            local req = request("/sandboxes")
            assert.are.equal(200, req.response.status)
            assert.are.equal('{"count":0,"sandboxes":[],"metadata":{}}', req.response.body)
            testkit.set_routes{ ["alice/sb"] = { address = "10.0.0.7" } }
            req = request("/sandboxes")
            assert.are.equal(1, req.response.json.count)
        end)

        it("lists a user's own sandboxes only, walking only their key range, when auth is on", function()
            local auth = require "auth"
            local routes = require "sp.routes"
            local saved_enabled, saved_authenticate = auth.enabled, auth.authenticate
            local who
            auth.enabled = true
            auth.authenticate = function(req)
                req.ctx.identity = who
                return true
            end
            local ok, err = pcall(function()
                for i = 1, 5000 do
                    routes.set("u" .. (i % 20) .. "/sb" .. i, { name = "sb" .. i,
                        user = "u" .. (i % 20), port = 1, ready = true })
                end
                routes.set("alice/a", { name = "a", user = "alice", port = 1, ready = true })
                routes.set("alice/b", { name = "b", user = "alice", port = 1, ready = true })
                who = { user = "alice", admin = false }
                local e0 = sandboxes.stats.examined
                local b = request("/sandboxes").response.json
                assert.are.same({ "alice/a", "alice/b" }, { b.sandboxes[1].path, b.sandboxes[2].path })
                assert.are.equal(2, b.count)
                local work = sandboxes.stats.examined - e0
                assert.is_true(work < 200, "examined " .. work .. " of 5,002 entries")
                who = { user = "u3", admin = false }
                b = request("/sandboxes?limit=1000").response.json
                assert.are.equal(250, b.count)
                for _, e in ipairs(b.sandboxes) do
                    assert.are.equal("u3", e.user)
                end
                who = { user = "ops", admin = true }
                b = request("/sandboxes?limit=10").response.json
                assert.are.equal(10, b.count)
                assert.is_string(b.metadata.continue)
            end)
            auth.enabled, auth.authenticate = saved_enabled, saved_authenticate
            assert(ok, err)
        end)

        it("lists the unowned sandboxes to auth.unowned_owner, not to other users", function()
            local auth = require "auth"
            local routes = require "sp.routes"
            local saved = { auth.enabled, auth.authenticate, auth.unowned_owner }
            local who
            auth.enabled = true
            auth.authenticate = function(req)
                req.ctx.identity = who
                return true
            end
            local ok, err = pcall(function()
                routes.set("default/orphan", { name = "orphan", port = 1, ready = true })
                routes.set("carol/own", { name = "own", user = "carol", port = 1, ready = true })
                routes.set("dave/x", { name = "x", user = "dave", port = 1, ready = true })
                local function paths()
                    local out = {}
                    for _, e in ipairs(request("/sandboxes").response.json.sandboxes) do
                        out[#out + 1] = e.path
                    end
                    return out
                end
                who = { user = "carol", admin = false }
                auth.unowned_owner = nil
                assert.are.same({ "carol/own" }, paths())
                auth.unowned_owner = "carol"
                assert.are.same({ "carol/own", "default/orphan" }, paths())
                who = { user = "dave", admin = false }
                assert.are.same({ "dave/x" }, paths())
            end)
            auth.enabled, auth.authenticate, auth.unowned_owner = saved[1], saved[2], saved[3]
            assert(ok, err)
        end)

        it("applies the endpoints' method rules", function()
            local req = request("/sandboxes", { method = "POST" })
            assert.are.equal(405, req.response.status)
            req = request("/health", { method = "DELETE" })
            assert.are.equal(405, req.response.status)
        end)

        it("sends everything else to the router", function()
            testkit.set_routes{ ["alice/sb"] = { address = "10.0.0.7", port = 9000 } }
            local req = request("/alice/sb/files?x=1")
            assert.are.equal("forward", req:decision())
            assert.are.equal("10.0.0.7", req.forwarded.host)
            assert.are.equal(9000, req.forwarded.port)
            assert.are.equal("/files?x=1", req.forwarded.path)
            assert.are.equal("alice/sb", req.ctx.route.key)
        end)

        it("sends near-miss endpoint paths to the router", function()
            for _, t in ipairs({ "/health/", "/healthz/", "/healthzx", "/HEALTH", "/sandboxes/", "/" }) do
                local req = request(t)
                assert.are.equal(400, req.response.status, t)
                assert.are.same({ error = "bad request path",
                    expected = "/{user}/{sandbox}/{path} or /{user}/{sandbox}:{port}/{path}" },
                    req.response.json, t)
            end
            local req = request("/health/sb")
            assert.are.equal(404, req.response.status)
            assert.are.same({ error = "sandbox not found", path = "health/sb" }, req.response.json)
        end)

        it("answers only /metrics on the metrics listener", function()
            testkit.set_routes{ ["alice/sb"] = { address = "10.0.0.7" } }
            local req = request("/alice/sb/", { listener = "metrics" })
            assert.are.equal(404, req.response.status)
            req = request("/metrics", { listener = "metrics" })
            assert.are.equal(200, req.response.status)
            assert.matches("^# HELP", req.response.body)
        end)

        it("dispatches each request to exactly one handler", function()
            local s_demo = spy.on(demo_sandbox, "handle")
            local s_router = spy.on(router, "handle")
            finally(function()
                demo_sandbox.handle:revert()
                router.handle:revert()
            end)
            request("/", { listener = "demo" })
            assert.spy(s_demo).was.called(1)
            assert.spy(s_router).was_not.called()
            request("/health")
            assert.spy(s_demo).was.called(1)
            assert.spy(s_router).was_not.called()
            request("/alice/sb")
            assert.spy(s_router).was.called(1)
            assert.spy(s_demo).was.called(1)
        end)
    end)

    describe("on_start", function()
        it("starts discovery on worker 0 only", function()
            local s = stub(discovery, "start")
            local real_worker_id = core.worker_id
            finally(function()
                s:revert()
                core.worker_id = real_worker_id
            end)
            assert.are.equal(0, core.worker_id())
            init.on_start()
            assert.stub(s).was.called(1)
            core.worker_id = function() return 1 end
            init.on_start()
            assert.stub(s).was.called(1)
        end)

        it("leaves the routes alone when no source is configured (test mode)", function()
            testkit.set_routes{ ["alice/sb"] = { address = "10.0.0.7" } }
            init.on_start()
            assert.is_not_nil(require("sp.routes").get("alice/sb"))
        end)
    end)

    describe("check", function()
        local real_settings = core.settings
        local files = {}

        local function with_file(text)
            local path = os.tmpname()
            files[#files + 1] = path
            if text then
                local f = assert(io.open(path, "wb"))
                f:write(text)
                f:close()
            else
                os.remove(path)
            end
            core.settings = function()
                local s = real_settings()
                s.sandboxes_file = path
                return s
            end
            return path
        end

        after_each(function()
            core.settings = real_settings
            for _, p in ipairs(files) do
                os.remove(p)
            end
            files = {}
        end)

        it("finds no problem in test mode, where core.settings() has no sandboxes_file", function()
            assert.is_nil(core.settings().sandboxes_file)
            assert.are.same({}, init.check())
        end)

        it("finds no problem in the demo sandboxes file", function()
            local src = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
            local f = assert(io.open(src .. "../../scripts/demo/sandboxes.json", "rb"))
            local text = f:read("*a")
            f:close()
            with_file(text)
            assert.are.same({}, init.check())
        end)

        it("reports a broken sandboxes file", function()
            local path = with_file('{"items": [')
            local problems = init.check()
            assert.are.equal(1, #problems)
            assert.are.equal(1, problems[1]:find("sandboxes file " .. path .. ": invalid JSON", 1, true))
        end)

        it("reports a missing sandboxes file", function()
            with_file(nil)
            local problems = init.check()
            assert.are.equal(1, #problems)
            assert.matches("^sandboxes file: ENOENT", problems[1])
        end)

        it("reports unusable items", function()
            with_file('{"items":[{"metadata":{"name":"ok"}},{"metadata":{}},null]}')
            assert.are.same({ "sandboxes file item 2: metadata.name is missing",
                "sandboxes file item 3: not an object" }, init.check())
        end)

        it("does not change the routes or the source state", function()
            with_file('{"items":[{"metadata":{"name":"ok"}}]}')
            init.check()
            assert.are.equal(0, require("sp.routes").count())
            assert.is_nil(sp_dict:get("source"))
        end)
    end)
end)
