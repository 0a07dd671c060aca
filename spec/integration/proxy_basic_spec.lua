-- Proxying basics against the real binary and spec/fixtures/upstream.py.
local H = require "spec.helpers.proxy"
local cjson = require "cjson"

describe("proxying", function()
    local up, px

    setup(function()
        up = H.upstream{ name = "up1" }
        px = H.start{ sandboxes = {
            H.sandbox("alice", "sb1", up.port),
            H.sandbox("bob", "starting", up.port, { ready = false }),
        } }
    end)

    teardown(function()
        H.stop_all()
    end)

    it("forwards the rest of the path and the query exactly", function()
        local r = assert(px:get("/alice/sb1/echo/a%2Fb/%7Ex?q=1&x=%20y&q=2"))
        assert.are.equal(200, r.status)
        local e = cjson.decode(r.body)
        assert.are.equal("/echo/a%2Fb/%7Ex?q=1&x=%20y&q=2", e.target)
        assert.are.equal("GET", e.method)
        assert.is_truthy(r.headers["x-request-id"])
    end)

    it("answers 404 for an unknown sandbox and 503 for one not ready", function()
        local r = assert(px:get("/alice/nope/x"))
        assert.are.equal(404, r.status)
        assert.are.same({ error = "sandbox not found", path = "alice/nope" }, cjson.decode(r.body))
        r = assert(px:get("/bob/starting/x"))
        assert.are.equal(503, r.status)
        assert.are.equal("2", r.headers["retry-after"])
        local b = cjson.decode(r.body)
        assert.are.equal("sandbox not ready", b.error)
        assert.are.equal("DependenciesNotReady", b.reason)
    end)
end)
