-- WebSocket (Upgrade) through the proxy: the 101 answer turns the connection into a byte
-- tunnel in both directions; a refused upgrade is an ordinary response. tunnel_idle_timeout
-- is an idle timeout, not a total one: traffic in either direction alone keeps a tunnel open.
local H = require "spec.helpers.proxy"
local ws = require "spec.helpers.ws"
local socket = require "socket"
local cjson = require "cjson"

local IDLE = 1          -- tunnel_idle_timeout (s)
local GAP = 0.2         -- seconds between two messages of a busy tunnel: IDLE / 5
local COUNT = 15        -- messages of a busy tunnel: busy for 3 s, three times IDLE

describe("websocket tunnel", function()
    local up, px

    setup(function()
        up = H.upstream{ name = "ws" }
        px = H.start{ sandboxes = { H.sandbox("alice", "sb", up.port) },
            set = { tunnel_idle_timeout = IDLE } }
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

    -- The tunnel closes an idle timeout after its last traffic: not at once (it is not closed by
    -- something else), and within a bounded wait. Returns the seconds it stayed open. `last` is
    -- when this client saw the last traffic, which is after the proxy relayed it by as long as a
    -- loaded machine kept this process from running: the lower bound leaves IDLE / 2 for that
    -- (a close that ignored the idle time would come at once after the traffic; one that never
    -- came fails the receive).
    local function closed_when_idle(c, last)
        local op, err = c:receive(IDLE + 5)
        local idle = socket.gettime() - last
        assert.is_nil(op, "a message arrived on an idle tunnel")
        assert.are.equal("closed", err)
        assert.is_true(idle > IDLE / 2, "closed after " .. idle .. " s idle")
        return idle
    end

    it("keeps a tunnel open while only the client sends, then closes it when idle", function()
        -- /ws-sink never answers a message: only client->sandbox traffic resets the timer
        local c = assert(ws.connect{ host = "127.0.0.1", port = px.port, path = "/alice/sb/ws-sink" })
        local t0 = socket.gettime()
        for i = 1, COUNT do
            socket.sleep(GAP)
            local ok, err = c:send_text("m" .. i)
            assert(ok, "message " .. i .. ": the busy tunnel was closed: " .. tostring(err))
        end
        assert.is_true(socket.gettime() - t0 > 2 * IDLE)
        assert(c:send_text("__count__"))
        local op, msg = c:receive(5)
        assert.are.equal("text", op, "the busy tunnel was closed: " .. tostring(msg))
        assert.are.equal(COUNT, cjson.decode(msg).messages)
        closed_when_idle(c, socket.gettime())
    end)

    it("keeps a tunnel open while only the sandbox sends, then closes it when idle", function()
        -- /ws-tick sends COUNT messages GAP apart; the client never sends
        local c = assert(ws.connect{ host = "127.0.0.1", port = px.port,
            path = ("/alice/sb/ws-tick?n=%d&interval_ms=%d"):format(COUNT, GAP * 1000) })
        local t0 = socket.gettime()
        local last
        for i = 0, COUNT - 1 do
            local op, msg = c:receive(5)
            assert.are.equal("text", op, "tick " .. i .. ": the busy tunnel was closed: "
                .. tostring(msg))
            assert.are.equal("tick " .. i, msg)
            last = socket.gettime()
        end
        assert.is_true(last - t0 > 2 * IDLE)
        closed_when_idle(c, last)
    end)

    it("passes a refused upgrade through as a normal response", function()
        local c, err, resp = ws.connect{ host = "127.0.0.1", port = px.port, path = "/alice/sb/echo" }
        assert.is_nil(c)
        assert.is_truthy(err)
        assert.are.equal(200, resp.status)
    end)
end)
