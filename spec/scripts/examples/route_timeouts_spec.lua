-- examples/route_timeouts.lua: per-sandbox timeouts from config (exact key > user wildcard >
-- default, field by field), set on the request before the built-in router decides.
local testkit = require "sp.testkit"

local MODULE = "examples.route_timeouts"

local CONFIG = {
    default = { first_byte = 180 },
    ["alice/*"] = { first_byte = 900 },
    ["bob/build"] = { idle = 3600 },
    ["carol/*"] = { connect = 2, idle = 60 },
    ["carol/ci"] = { idle = 7200 },
}

-- A fresh instance of the module with config section `section`.
local function load(section)
    return testkit.load(MODULE, "route_timeouts", section)
end

local function send(rt, target)
    local req = testkit.request{ target = target }
    rt.handle(req)
    return req
end

describe("route_timeouts", function()
    local rt

    before_each(function()
        testkit.set_routes{
            ["alice/sb"] = { address = "10.0.0.1" },
            ["bob/build"] = { address = "10.0.0.2" },
            ["bob/web"] = { address = "10.0.0.3" },
            ["carol/ci"] = { address = "10.0.0.4" },
            ["carol/dev"] = { address = "10.0.0.5" },
            ["dan/sb"] = { address = "10.0.0.6" },
            ["erin/down"] = { address = "10.0.0.7", ready = false },
        }
        rt = load(CONFIG)
    end)

    after_each(function()
        testkit.clear_routes()
    end)

    describe("precedence", function()
        it("default applies to sandboxes nothing else names", function()
            assert.are.same({ first_byte = 180 }, rt.timeouts_for("dan", "sb"))
            assert.are.same({ first_byte = 180 }, rt.timeouts_for("bob", "web"))
        end)

        it("the user wildcard beats the default", function()
            assert.are.same({ first_byte = 900 }, rt.timeouts_for("alice", "sb"))
            assert.are.same({ first_byte = 900 }, rt.timeouts_for("alice", "other"))
        end)

        it("the exact key beats the default, field by field", function()
            assert.are.same({ first_byte = 180, idle = 3600 }, rt.timeouts_for("bob", "build"))
        end)

        it("the exact key beats the user wildcard, which beats the default, field by field",
            function()
                assert.are.same({ first_byte = 180, connect = 2, idle = 7200 },
                    rt.timeouts_for("carol", "ci"))
                assert.are.same({ first_byte = 180, connect = 2, idle = 60 },
                    rt.timeouts_for("carol", "dev"))
            end)

        it("an exact key overrides the same field of the wildcard and the default", function()
            local r = load{ default = { first_byte = 10 }, ["u/*"] = { first_byte = 20 },
                ["u/x"] = { first_byte = 30 } }
            assert.are.same({ first_byte = 30 }, r.timeouts_for("u", "x"))
            assert.are.same({ first_byte = 20 }, r.timeouts_for("u", "y"))
            assert.are.same({ first_byte = 10 }, r.timeouts_for("v", "x"))
        end)

        it("an exact key inherits the wildcard's value, not the default's, for fields it lacks",
            function()
                local r = load{ default = { first_byte = 10, idle = 10 },
                    ["u/*"] = { first_byte = 20 }, ["u/x"] = { idle = 1 } }
                assert.are.same({ first_byte = 20, idle = 1 }, r.timeouts_for("u", "x"))
                assert.are.same({ first_byte = 20, idle = 10 }, r.timeouts_for("u", "y"))
            end)

        it("a wildcard is per user, not a prefix", function()
            assert.are.same({ first_byte = 180 }, rt.timeouts_for("alice2", "sb"))
            assert.are.same({ first_byte = 180 }, rt.timeouts_for("alic", "sb"))
        end)

        it("gives nothing without any config", function()
            local r = load(nil)
            assert.are.same({}, r.timeouts_for("alice", "sb"))
            r = load{ ["bob/build"] = { idle = 5 } }
            assert.are.same({ idle = 5 }, r.timeouts_for("bob", "build"))
            assert.are.same({}, r.timeouts_for("bob", "web"))
        end)
    end)

    describe("handle", function()
        it("sets the sandbox's timeouts and forwards through the built-in router", function()
            local req = send(rt, "/alice/sb/run?x=1")
            assert.are.equal("10.0.0.1", req.forwarded.host)
            assert.are.equal("/run?x=1", req.forwarded.path)
            assert.are.same({ first_byte = 900 }, req.forwarded.timeouts)

            req = send(rt, "/bob/build/")
            assert.are.equal("10.0.0.2", req.forwarded.host)
            assert.are.same({ first_byte = 180, idle = 3600 }, req.forwarded.timeouts)

            req = send(rt, "/carol/ci/x")
            assert.are.same({ first_byte = 180, connect = 2, idle = 7200 }, req.forwarded.timeouts)

            req = send(rt, "/dan/sb/x")
            assert.are.same({ first_byte = 180 }, req.forwarded.timeouts)
        end)

        it("reads the key as the router does (percent-decoded segments)", function()
            local req = send(rt, "/al%69ce/sb/x")
            assert.are.equal("10.0.0.1", req.forwarded.host)
            assert.are.same({ first_byte = 900 }, req.forwarded.timeouts)
            req = send(rt, "/bob/b%75ild")
            assert.are.same({ first_byte = 180, idle = 3600 }, req.forwarded.timeouts)
        end)

        it("calls set_timeouts only when something is configured", function()
            local r = load{ ["bob/build"] = { idle = 5 } }
            local req = send(r, "/bob/web/x")
            assert.are.same({}, req.forwarded.timeouts)
            assert.is_nil(req.ctx.route_timeouts)
            req = send(r, "/bob/build/x")
            assert.are.same({ idle = 5 }, req.forwarded.timeouts)
        end)

        it("leaves the answers to the built-in router", function()
            local req = send(rt, "/alice/ghost/x")
            assert.are.equal(404, req.response.status)
            assert.are.same({ error = "sandbox not found", path = "alice/ghost" }, req.response.json)
            assert.are.same({ first_byte = 900 }, req.ctx.route_timeouts)

            req = send(rt, "/erin/down/x")
            assert.are.equal(503, req.response.status)
            assert.are.equal("sandbox not ready", req.response.json.error)

            req = send(rt, "/nouser")
            assert.are.equal(400, req.response.status)
            assert.is_nil(req.ctx.route_timeouts)
        end)

        it("delegates to the built-in router, not to itself", function()
            assert.is_function(rt.delegate.handle)
            assert.are_not.equal(rt.handle, rt.delegate.handle)
            -- the built-in router's own file, whatever the override directory holds
            local builtin = require("sp.core").settings().builtin_dir .. "/router.lua"
            assert.are.same(debug.getinfo(dofile(builtin).handle, "S").source,
                debug.getinfo(rt.delegate.handle, "S").source)
        end)

        it("configure() replaces the compiled config", function()
            rt.configure{ default = { idle = 1 } }
            assert.are.same({ idle = 1 }, send(rt, "/alice/sb/x").forwarded.timeouts)
        end)
    end)

    describe("config checks at load", function()
        local bad = {
            { default = { firstbyte = 5 } },
            { default = { first_byte = 0 } },
            { default = { first_byte = -1 } },
            { default = { first_byte = "5" } },
            { default = { idle = math.huge } },
            { default = 5 },
            { ["alice/*"] = { timeout = 5 } },
            { alice = { idle = 5 } },
            { ["alice/b/c"] = { idle = 5 } },
            { ["*/sb"] = { idle = 5 } },
            { ["alice/sb*"] = { idle = 5 } },
            { ["/sb"] = { idle = 5 } },
            { ["alice/"] = { idle = 5 } },
            { [1] = { idle = 5 } },
        }
        for i, section in ipairs(bad) do
            it("rejects bad config #" .. i, function()
                assert.has_error(function() load(section) end)
            end)
        end

        it("accepts every field", function()
            local r = load{ default = { connect = 1, first_byte = 2, idle = 3 } }
            assert.are.same({ connect = 1, first_byte = 2, idle = 3 }, r.timeouts_for("x", "y"))
        end)
    end)
end)
