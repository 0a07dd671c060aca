-- sandboxes.lua: GET /sandboxes lists the real route table, sorted by path.
local testkit = require "sp.testkit"
local cjson = require "cjson"
local sandboxes = require "sandboxes"

local handler = sandboxes.endpoints["/sandboxes"]

local function get(method)
    local req = testkit.request{ method = method or "GET", target = "/sandboxes" }
    handler(req)
    return req
end

describe("sandboxes listing", function()
    before_each(function()
        testkit.clear_routes()
    end)

    after_each(function()
        testkit.clear_routes()
    end)

    it("serves exactly /sandboxes", function()
        local paths = {}
        for p in pairs(sandboxes.endpoints) do
            paths[#paths + 1] = p
        end
        assert.are.same({ "/sandboxes" }, paths)
        assert.is_function(handler)
    end)

    it("answers an empty table with exactly {\"count\":0,\"sandboxes\":[]} as JSON", function()
        local req = get()
        assert.are.equal(200, req.response.status)
        assert.are.equal('{"count":0,"sandboxes":[]}', req.response.body)
        assert.are.equal("application/json", req.response.headers["Content-Type"])
        assert.are.equal(0, req.response.json.count)
    end)

    it("shows an unowned sandbox's user as null", function()
        testkit.set_routes{ ["default/pool"] = { address = "10.0.0.1", user = false },
            ["default/mine"] = { address = "10.0.0.2" } }
        local b = get().response.json
        assert.are.equal("default/mine", b.sandboxes[1].path)
        assert.are.equal("default", b.sandboxes[1].user)
        assert.are.equal("default/pool", b.sandboxes[2].path)
        assert.are.equal(cjson.null, b.sandboxes[2].user)
    end)

    it("lists every route sorted by path with its fields", function()
        testkit.set_routes{
            ["bob/nightly"] = { namespace = "team-b", ready = false, reason = "SandboxSuspended",
                mode = "Suspended" },
            ["alice/my-sandbox"] = { address = "10.8.1.23", port = 8888,
                service = "my-sandbox.default.svc.cluster.local" },
            ["alice-x/a"] = { address = "10.0.0.9", port = 9000,
                conflict = "also in namespace b; serving default" },
            ["alice/fresh"] = { ready = false },
        }
        local req = get()
        assert.are.equal(200, req.response.status)
        assert.are.equal("application/json", req.response.headers["Content-Type"])
        local b = req.response.json
        assert.are.equal(4, b.count)
        assert.are.equal(4, #b.sandboxes)
        local paths = {}
        for i, s in ipairs(b.sandboxes) do
            paths[i] = s.path
        end
        -- byte order: '-' (0x2d) sorts before '/' (0x2f)
        assert.are.same({ "alice-x/a", "alice/fresh", "alice/my-sandbox", "bob/nightly" }, paths)

        assert.are.same({
            path = "alice-x/a", namespace = "default", name = "a", user = "alice-x",
            service = cjson.null, address = "10.0.0.9", port = 9000, ready = true, claim = cjson.null,
            reason = "DependenciesReady", mode = "Running",
            conflict = "also in namespace b; serving default",
        }, b.sandboxes[1])
        assert.are.same({
            path = "alice/fresh", namespace = "default", name = "fresh", user = "alice",
            service = cjson.null, address = cjson.null, port = 8888, ready = false,
            reason = "DependenciesNotReady", mode = "Running", claim = cjson.null,
        }, b.sandboxes[2])
        assert.are.same({
            path = "alice/my-sandbox", namespace = "default", name = "my-sandbox", user = "alice",
            service = "my-sandbox.default.svc.cluster.local", address = "10.8.1.23", port = 8888,
            ready = true, reason = "DependenciesReady", mode = "Running", claim = cjson.null,
        }, b.sandboxes[3])
        assert.are.same({
            path = "bob/nightly", namespace = "team-b", name = "nightly", user = "bob",
            service = cjson.null, address = cjson.null, port = 8888, ready = false,
            reason = "SandboxSuspended", mode = "Suspended", claim = cjson.null,
        }, b.sandboxes[4])
    end)

    it("encodes a single sandbox as a one-element array", function()
        testkit.set_routes{ ["alice/sb"] = { address = "10.0.0.1" } }
        local req = get()
        assert.matches('"sandboxes":%[{', req.response.body)
        assert.are.equal(1, req.response.json.count)
        assert.are.equal("alice/sb", req.response.json.sandboxes[1].path)
    end)

    it("reflects routes written by discovery", function()
        local discovery = require "discovery"
        discovery.reset()
        discovery.upsert(testkit.sandbox("alice", "sb", { ip = "10.1.2.3" }))
        local b = get().response.json
        assert.are.equal(1, b.count)
        assert.are.equal("alice/sb", b.sandboxes[1].path)
        assert.are.equal("10.1.2.3", b.sandboxes[1].address)
        discovery.reset()
        assert.are.equal('{"count":0,"sandboxes":[]}', get().response.body)
    end)

    it("answers HEAD like GET", function()
        local req = get("HEAD")
        assert.are.equal(200, req.response.status)
        assert.are.equal('{"count":0,"sandboxes":[]}', req.response.body)
    end)

    for _, m in ipairs({ "POST", "PUT", "DELETE", "PATCH" }) do
        it("answers " .. m .. " with 405 and Allow", function()
            testkit.set_routes{ ["alice/sb"] = { address = "10.0.0.1" } }
            local req = get(m)
            assert.are.equal(405, req.response.status)
            assert.are.equal("GET, HEAD", req.response.headers.Allow)
            assert.are.same({ error = "method not allowed" }, req.response.json)
        end)
    end

    describe("listing(keep)", function()
        before_each(function()
            testkit.set_routes{
                ["alice/a"] = { address = "10.0.0.1" },
                ["alice/b"] = { ready = false },
                ["bob/c"] = { address = "10.0.0.3" },
            }
        end)

        it("returns everything without a filter", function()
            local l = sandboxes.listing()
            assert.are.equal(3, l.count)
            assert.are.equal(3, #l.sandboxes)
        end)

        it("keeps only what keep(route) accepts, in order, with the right count", function()
            local seen = {}
            local l = sandboxes.listing(function(r)
                seen[#seen + 1] = r.key
                return r.ready
            end)
            assert.are.same({ "alice/a", "alice/b", "bob/c" }, seen)
            assert.are.equal(2, l.count)
            assert.are.equal("alice/a", l.sandboxes[1].path)
            assert.are.equal("bob/c", l.sandboxes[2].path)
        end)

        it("filters by user", function()
            local l = sandboxes.listing(function(r) return r.user == "bob" end)
            assert.are.equal(1, l.count)
            assert.are.equal("bob/c", l.sandboxes[1].path)
        end)

        it("answers the exact empty body when the filter keeps nothing", function()
            local req = testkit.request{ target = "/sandboxes" }
            sandboxes.respond(req, sandboxes.listing(function() return false end))
            assert.are.equal(200, req.response.status)
            assert.are.equal('{"count":0,"sandboxes":[]}', req.response.body)
            assert.are.equal("application/json", req.response.headers["Content-Type"])
        end)

        it("answers a filtered listing as JSON", function()
            local req = testkit.request{ target = "/sandboxes" }
            sandboxes.respond(req, sandboxes.listing(function(r) return r.user == "alice" end))
            assert.are.equal(200, req.response.status)
            assert.are.equal("application/json", req.response.headers["Content-Type"])
            assert.are.equal(2, req.response.json.count)
        end)
    end)

    it("entry() maps a route to the listed fields", function()
        local e = sandboxes.entry({ key = "u/n", namespace = "ns", name = "n", user = "u",
            port = 1, ready = false, reason = "PodFailed", mode = "Running" })
        assert.are.same({ path = "u/n", namespace = "ns", name = "n", user = "u",
            service = cjson.null, address = cjson.null, port = 1, ready = false,
            reason = "PodFailed", mode = "Running", claim = cjson.null }, e)
    end)

    it("entry() names the claim of a claimed sandbox and the sandbox of a claim's alias",
        function()
        local e = sandboxes.entry({ key = "u/my-claim", namespace = "ns", name = "pool-x2k4d",
            user = "u", port = 1, ready = true, reason = "DependenciesReady", mode = "Running",
            claim = "my-claim", alias_of = "u/pool-x2k4d" })
        assert.are.equal("my-claim", e.claim)
        assert.are.equal("u/pool-x2k4d", e.alias_of)
        assert.are.equal("pool-x2k4d", e.name)
    end)
end)
