-- Graceful shutdown: SIGTERM stops accepting, reports not-ready, lets in-flight requests and
-- tunnels finish, then exits 0; a second signal or the drain timeout closes what is left.
local H = require "spec.helpers.proxy"
local ws = require "spec.helpers.ws"
local socket = require "socket"

describe("SIGTERM", function()
    teardown(function()
        H.stop_all()
    end)

    it("finishes in-flight requests, then exits 0", function()
        local up = H.upstream{ name = "drain" }
        local px = H.start{ sandboxes = { H.sandbox("a", "b", up.port) }, set = { drain_timeout = 10 } }
        local c = assert(px:connect{ timeout = 10 })
        assert(c:send_raw("GET /a/b/delay?ms=700 HTTP/1.1\r\nHost: x\r\n\r\n"))
        H.net.wait_until(function() return up.stats().requests >= 1 end, 5)
        assert(px.proc:signal("TERM"))
        -- new connections are refused once the listener is closed
        H.net.wait_until(function()
            local r = H.http.request{ port = px.port, path = "/health", timeout = 0.5 }
            return r == nil
        end, 5)
        local r = assert(c:read_response{ timeout = 10 })
        assert.are.equal(200, r.status)
        assert.are.equal("close", r.headers["connection"])
        local code, how = px.proc:wait(10)
        assert.are.equal("exited", how)
        assert.are.equal(0, code)
        assert.matches('"msg":"draining"', px:stderr())
        assert.matches('"msg":"stopped"', px:stderr())
    end)

    it("closes idle keep-alive connections at once", function()
        local up = H.upstream{ name = "idle" }
        local px = H.start{ sandboxes = { H.sandbox("a", "b", up.port) } }
        local c = assert(px:connect{ timeout = 5 })
        assert.are.equal(200, assert(c:request{ path = "/a/b/echo" }).status)
        local t0 = socket.gettime()
        assert(px.proc:signal("TERM"))
        assert.is_true(c:closed_by_peer(5))
        local code = px.proc:wait(10)
        assert.are.equal(0, code)
        assert.is_true(socket.gettime() - t0 < 3)
    end)

    it("waits for an open tunnel until the drain timeout, then closes it and exits 0", function()
        local up = H.upstream{ name = "t" }
        local px = H.start{ sandboxes = { H.sandbox("a", "b", up.port) }, set = { drain_timeout = 1 } }
        local conn = assert(ws.connect{ host = "127.0.0.1", port = px.port, path = "/a/b/ws" })
        local t0 = socket.gettime()
        assert(px.proc:signal("TERM"))
        assert(conn:send_text("still here"))
        local op, msg = conn:receive(5)
        assert.are.equal("text", op)
        assert.are.equal("still here", msg)
        local code = px.proc:wait(10)
        assert.are.equal(0, code)
        assert.is_true(socket.gettime() - t0 >= 0.9)
        op = conn:receive(2)
        assert.is_nil(op)
    end)
end)
