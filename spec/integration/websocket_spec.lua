-- WebSocket (Upgrade) through the proxy: the 101 answer turns the connection into a byte
-- tunnel in both directions; a refused upgrade is an ordinary response.
local H = require "spec.helpers.proxy"
local ws = require "spec.helpers.ws"

describe("websocket tunnel", function()
    local up, px

    setup(function()
        up = H.upstream{ name = "ws" }
        px = H.start{ sandboxes = { H.sandbox("alice", "sb", up.port) },
            set = { tunnel_idle_timeout = 1 } }
    end)

    teardown(function()
        H.stop_all()
    end)

    it("echoes text and binary frames through the tunnel", function()
        local c = assert(ws.connect{ host = "127.0.0.1", port = px.port, path = "/alice/sb/ws" })
        assert(c:send_text("hello through the proxy"))
        local op, msg = c:receive(5)
        assert.are.equal("text", op)
        assert.are.equal("hello through the proxy", msg)
        local big = string.rep("\0\1\2\3\255", 20000)
        assert(c:send_binary(big))
        op, msg = c:receive(5)
        assert.are.equal("binary", op)
        assert.are.equal(big, msg)
        assert(c:ping("p"))
        op, msg = c:receive(5)
        assert.are.equal("pong", op)
        assert.are.equal("p", msg)
        assert(c:close(1000))
    end)

    it("keeps many messages in order", function()
        local c = assert(ws.connect{ host = "127.0.0.1", port = px.port, path = "/alice/sb/ws" })
        for i = 1, 200 do
            assert(c:send_text("m" .. i))
        end
        for i = 1, 200 do
            local op, msg = c:receive(5)
            assert.are.equal("text", op)
            assert.are.equal("m" .. i, msg)
        end
        c:close()
    end)

    it("closes an idle tunnel after tunnel_idle_timeout", function()
        local c = assert(ws.connect{ host = "127.0.0.1", port = px.port, path = "/alice/sb/ws" })
        local op, err = c:receive(4)
        assert.is_nil(op)
        assert.are.equal("closed", err)
    end)

    it("passes a refused upgrade through as a normal response", function()
        local c, err, resp = ws.connect{ host = "127.0.0.1", port = px.port, path = "/alice/sb/echo" }
        assert.is_nil(c)
        assert.is_truthy(err)
        assert.are.equal(200, resp.status)
    end)
end)
