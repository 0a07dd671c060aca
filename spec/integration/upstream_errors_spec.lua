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

-- A sandbox addressed by a name (a serviceFQDN) is resolved by libuv's thread pool. Here the
-- pool has one thread, kept busy by the access log writing to a FIFO nobody reads, so the lookup
-- waits in the queue while its connection is closed: by the client going away (the close comes
-- from a read callback, and the cancelled lookup's callback runs a loop iteration after the
-- connection's close callbacks) and by the connect timeout. The lookup holds its own reference to
-- the connection, so its callback finds it still allocated (under ASan a use-after-free aborts the
-- proxy, and this fails). The event log on stderr is not held up by the stuck stdout meanwhile.
describe("a sandbox connection closed during its name lookup", function()
    local pstat = require "posix.sys.stat"
    local fcntl = require "posix.fcntl"
    local unistd = require "posix.unistd"
    local bit = require "bit"
    local up, px, fifo, rfd

    -- Reads what the FIFO holds (the proxy's access log) without blocking.
    local function drain()
        local got = {}
        while true do
            local s = unistd.read(rfd, 65536)
            if not s or #s == 0 then break end
            got[#got + 1] = s
        end
        return table.concat(got)
    end

    -- True when one of the proxy's threads is blocked in write(1, ...): the thread pool's writer
    -- of the access log, stuck on the full FIFO (x86-64 syscall 1, arm64 64).
    local function writer_blocked()
        local task = "/proc/" .. px:pid() .. "/task"
        local ls = io.popen("ls " .. task)
        local found = false
        for tid in ls:lines() do
            local f = io.open(task .. "/" .. tid .. "/syscall")
            local line = f and f:read("*l")
            if f then f:close() end
            if line and (line:match("^1 0x1 ") or line:match("^64 0x1 ")) then
                found = true
            end
        end
        ls:close()
        return found
    end

    setup(function()
        up = H.upstream{ name = "named" }
        fifo = H.tmpdir() .. "/access.fifo"
        assert(pstat.mkfifo(fifo, tonumber("600", 8)))
        rfd = assert(fcntl.open(fifo, bit.bor(fcntl.O_RDONLY, fcntl.O_NONBLOCK)))
        px = H.start{ stdout = fifo, env = { UV_THREADPOOL_SIZE = "1" },
            set = { connect_timeout = 2, access_log_flush = 0.001 },
            sandboxes = { H.sandbox("alice", "named", up.port, { ip = false, service = "localhost" }) } }
    end)

    teardown(function()
        if rfd then drain() end
        H.stop_all()
        if rfd then unistd.close(rfd) end
    end)

    it("survives a client going away and a connect timeout; the name resolves once the pool is free", function()
        -- (no request to the sandbox before: a pooled connection to it would need no lookup)
        -- fill the FIFO with access-log lines until the pool's writer blocks on it
        local path = "/health?" .. string.rep("p", 2000)
        H.net.wait_until(function()
            local h = assert(px:get(path))
            assert.are.equal(200, h.status)
            return writer_blocked()
        end, 20, 0, "the access-log writer to block on the full FIFO")
        -- a request whose lookup waits in the queue; the request was read once a later request
        -- on another connection is answered (its bytes were there first)
        local c = assert(px:connect())
        assert(c:send_raw("GET /alice/named/echo HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert.are.equal(200, assert(px:get("/health")).status)
        c:close()
        -- the close and then the cancelled lookup's callback have run once a later request is
        -- answered twice over (each answer takes loop iterations of its own)
        assert.are.equal(200, assert(px:get("/health")).status)
        assert.are.equal(200, assert(px:get("/health")).status)
        px:check_alive()
        -- the connect timeout ends a request whose lookup waits
        local t = assert(px:get("/alice/named/echo"))
        assert.are.equal(504, t.status)
        assert.are.equal(200, assert(px:get("/health")).status)
        px:check_alive()
        -- free the pool: the name resolves again and the sandbox answers
        local log = ""
        H.net.wait_until(function()
            log = log .. drain()
            local e = px:get("/alice/named/echo")
            return e and e.status == 200
        end, 10, 0.02, "the sandbox to be reached by name again")
        px:check_alive()
        log = log .. drain()
        assert.truthy(log:find('"status":504', 1, true), "the 504 is in the access log")
    end)
end)
