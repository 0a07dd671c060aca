-- health.lua: /health, /ready and /live over the real route table and the shared dict "sp".
local testkit = require "sp.testkit"
local routes = require "sp.routes"
local shared = require "sp.shared"
local core = require "sp.core"
local cjson = require "cjson"
local health = require "health"

local sp_dict = assert(shared.dict("sp"))
local ISO8601 = "^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$"

local function call(path, method)
    local req = testkit.request{ method = method or "GET", target = path }
    health.endpoints[path](req)
    return req
end

describe("health endpoints", function()
    local real_draining = core.draining

    before_each(function()
        testkit.clear_routes()
        sp_dict:delete("source")
    end)

    after_each(function()
        core.draining = real_draining
        testkit.clear_routes()
        sp_dict:delete("source")
    end)

    it("serves exactly /health, /ready and /live", function()
        local paths = {}
        for p, h in pairs(health.endpoints) do
            assert.is_function(h)
            paths[#paths + 1] = p
        end
        table.sort(paths)
        assert.are.same({ "/health", "/live", "/ready" }, paths)
    end)

    describe("/health", function()
        it("reports ok, counts, an ISO 8601 UTC timestamp and the default source state", function()
            local req = call("/health")
            assert.are.equal(200, req.response.status)
            assert.are.equal("application/json", req.response.headers["Content-Type"])
            local b = req.response.json
            assert.are.equal("ok", b.status)
            assert.are.equal(0, b.sandboxes)
            assert.are.equal(0, b.ready)
            assert.is_string(b.timestamp)
            assert.matches(ISO8601, b.timestamp)
            assert.are.same({ synced = false, type = "none" }, b.source)
            assert.is_false(b.draining)
            assert.are.equal(core.version, b.version)
        end)

        it("counts all routes and the ready ones", function()
            testkit.set_routes{
                ["alice/a"] = { address = "10.0.0.1" },
                ["alice/b"] = { address = "10.0.0.2" },
                ["bob/c"] = { ready = false },
                ["bob/d"] = { ready = false, reason = "SandboxSuspended" },
                ["carol/e"] = { address = "10.0.0.5" },
            }
            local b = call("/health").response.json
            assert.are.equal(5, b.sandboxes)
            assert.are.equal(3, b.ready)
            assert.are.equal(routes.count(), b.sandboxes)
            assert.are.equal(routes.count_ready(), b.ready)
        end)

        it("reports the timestamp of now", function()
            local before = core.iso8601():sub(1, 16)
            local ts = call("/health").response.json.timestamp
            local after = core.iso8601():sub(1, 16)
            assert.is_true(ts:sub(1, 16) == before or ts:sub(1, 16) == after)
        end)

        it("includes the source state published in the shared dict", function()
            sp_dict:set("source", cjson.encode({ type = "file", path = "/x.json", synced = true,
                items = 4 }))
            local b = call("/health").response.json
            assert.are.same({ type = "file", path = "/x.json", synced = true, items = 4 }, b.source)
        end)

        it("falls back to the default source state when the dict holds garbage", function()
            sp_dict:set("source", "{not json")
            local b = call("/health").response.json
            assert.are.same({ synced = false, type = "none" }, b.source)
        end)

        it("answers HEAD", function()
            assert.are.equal(200, call("/health", "HEAD").response.status)
        end)
    end)

    describe("/ready", function()
        it("is 503 before the source has synced", function()
            local req = call("/ready")
            assert.are.equal(503, req.response.status)
            assert.are.same({ ready = false, reason = "sandbox source not synced yet" },
                req.response.json)
        end)

        it("is 503 while the source state says synced = false", function()
            sp_dict:set("source", cjson.encode({ type = "file", synced = false }))
            local req = call("/ready")
            assert.are.equal(503, req.response.status)
            assert.are.same({ ready = false, reason = "sandbox source not synced yet" },
                req.response.json)
        end)

        it("is 200 once the source state says synced", function()
            sp_dict:set("source", cjson.encode({ type = "file", synced = true, items = 0 }))
            local req = call("/ready")
            assert.are.equal(200, req.response.status)
            assert.are.same({ ready = true }, req.response.json)
        end)

        it("follows the state published by discovery", function()
            local discovery = require "discovery"
            discovery.publish_state({ synced = false })
            assert.are.equal(503, call("/ready").response.status)
            discovery.publish_state({ synced = true })
            assert.are.equal(200, call("/ready").response.status)
            discovery.publish_state({ synced = false })
        end)

        it("is 503 while draining, even when synced", function()
            sp_dict:set("source", cjson.encode({ synced = true }))
            core.draining = function() return true end
            local req = call("/ready")
            assert.are.equal(503, req.response.status)
            assert.are.same({ ready = false, reason = "draining" }, req.response.json)
        end)

        it("does not depend on the routes", function()
            sp_dict:set("source", cjson.encode({ synced = true }))
            testkit.set_routes{ ["alice/a"] = { ready = false } }
            assert.are.equal(200, call("/ready").response.status)
        end)
    end)

    describe("/live", function()
        it("is 200 live", function()
            local req = call("/live")
            assert.are.equal(200, req.response.status)
            assert.are.same({ live = true }, req.response.json)
        end)

        it("is 200 even before the source has synced", function()
            sp_dict:set("source", cjson.encode({ synced = false }))
            assert.are.equal(200, call("/live").response.status)
        end)

        it("is 503 naming the workers while the watchdog reports some stuck", function()
            assert.are.same({}, core.stuck_workers()) -- no worker here is stuck
            local s = stub(core, "stuck_workers", function() return { 1, 3 } end)
            local req = call("/live")
            s:revert()
            assert.are.equal(503, req.response.status)
            assert.are.same({ live = false, reason = "worker stuck", stuck_workers = { 1, 3 } },
                req.response.json)
            assert.are.equal(200, call("/live").response.status)
        end)
    end)

    describe("methods", function()
        for _, path in ipairs({ "/health", "/ready", "/live" }) do
            for _, m in ipairs({ "POST", "PUT", "DELETE", "PATCH", "OPTIONS" }) do
                it("answers " .. m .. " " .. path .. " with 405 and Allow", function()
                    local req = call(path, m)
                    assert.are.equal(405, req.response.status)
                    assert.are.equal("GET, HEAD", req.response.headers.Allow)
                    assert.are.same({ error = "method not allowed" }, req.response.json)
                end)
            end
        end
    end)

    describe("source_state", function()
        it("decodes the dict value, defaulting when absent", function()
            assert.are.same({ synced = false, type = "none" }, health.source_state())
            sp_dict:set("source", '{"synced":true,"type":"k8s"}')
            assert.are.same({ synced = true, type = "k8s" }, health.source_state())
        end)
    end)
end)
