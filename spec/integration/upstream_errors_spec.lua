-- Upstream failures: refused connects (retried, then 502), a sandbox that binds late (the
-- retry succeeds), timeouts (504), a sandbox dying mid-response (the client connection is
-- closed, never a truncated response that looks complete), garbage (502), and a client that
-- goes away (the upstream request is aborted).
local H = require "spec.helpers.proxy"
local cjson = require "cjson"
local socket = require "socket"

describe("upstream errors", function()
    local up, px, dead_port

    setup(function()
        up = H.upstream{ name = "err" }
        dead_port = assert(H.net.free_port())
        px = H.start{ sandboxes = {
            H.sandbox("alice", "sb", up.port),
            H.sandbox("alice", "dead", dead_port),
        }, set = { first_byte_timeout = 0.5, connect_retry_delay = 0.05 } }
    end)

    teardown(function()
        H.stop_all()
    end)

    it("answers 502 JSON when the sandbox refuses connections, after retrying", function()
        local t0 = socket.gettime()
        local r = assert(px:get("/alice/dead/x"))
        local took = socket.gettime() - t0
        assert.are.equal(502, r.status)
        local b = cjson.decode(r.body)
        assert.are.equal("upstream connect failed", b.error)
        assert.are.equal(r.headers["x-request-id"], b.request_id)
        -- 3 retries at 0.05, 0.1, 0.2 s
        assert.is_true(took >= 0.3, "no retries happened (" .. took .. " s)")
    end)

    it("succeeds when the sandbox binds its port a moment after Ready", function()
        -- The test plays the sandbox: nothing listens when the request arrives; the port is
        -- bound 0.3 s later. Retries at 0.2, 0.4, 0.8 s (default delays) must reach it.
        local late_port = assert(H.net.free_port())
        local px2 = H.start{ sandboxes = { H.sandbox("alice", "late", late_port) } }
        local c = assert(px2:connect{ timeout = 10 })
        assert(c:send_raw("GET /alice/late/x HTTP/1.1\r\nHost: x\r\n\r\n"))
        socket.sleep(0.3) -- the scenario itself: the sandbox binds late
        local srv = assert(socket.bind("127.0.0.1", late_port))
        srv:settimeout(5)
        local s = assert(srv:accept())
        s:settimeout(5)
        repeat
            local line = assert(s:receive("*l"))
        until line == ""
        assert(s:send("HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate"))
        local r = assert(c:read_response{ timeout = 10 })
        assert.are.equal(200, r.status)
        assert.are.equal("late", r.body)
        s:close()
        srv:close()
        c:close()
    end)

    it("answers 504 JSON when the first byte takes too long", function()
        local r = assert(px:get("/alice/sb/delay?ms=3000"))
        assert.are.equal(504, r.status)
        assert.are.equal("upstream first byte timeout", cjson.decode(r.body).error)
    end)

    it("closes the client connection when the sandbox dies mid-response", function()
        local r, err = px:get("/alice/sb/close-mid?n=5000")
        assert.is_nil(r)
        assert.matches("protocol error", err)
        -- and the proxy still serves
        r = assert(px:get("/alice/sb/echo"))
        assert.are.equal(200, r.status)
    end)

    it("answers 502 for a response that is not HTTP", function()
        local r = assert(px:get("/alice/sb/garbage"))
        assert.are.equal(502, r.status)
        assert.are.equal("upstream protocol error", cjson.decode(r.body).error)
    end)

    it("answers 502 for a connection reset before any response", function()
        local r = assert(px:get("/alice/sb/reset"))
        assert.are.equal(502, r.status)
    end)

    it("closes the client connection on a bad chunk from the sandbox", function()
        local r, err = px:get("/alice/sb/bad-chunked")
        if r then
            -- the head may already have gone out; then the body must not look complete
            assert.is_true(r.status == 502)
        else
            assert.matches("protocol error", err)
        end
    end)

    it("aborts the upstream request when the client goes away", function()
        local c = assert(px:connect())
        assert(c:send_raw("GET /alice/sb/slow-body?chunks=100&interval_ms=50 HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert(c:receive_raw("*l", 5)) -- the status line: the exchange is under way
        -- Its upstream connection is open now (a new one, or one from the pool: counting from
        -- before the request would miss the second case). The body takes 5 s to stream; an
        -- abort closes that connection long before.
        local during = up.stats().open
        c:close()
        H.net.wait_until(function()
            return up.stats().open < during
        end, 3, 0.02, "the upstream connection to be closed")
    end)
end)
