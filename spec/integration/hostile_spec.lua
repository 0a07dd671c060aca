-- Hostile input: request-smuggling vectors (400, closed, nothing reaches the sandbox), hostile
-- sandbox responses (502, the connection not reused), tricky paths that must never cross from
-- one user's or sandbox's prefix to another's, slow clients, connection floods and upgrade
-- floods bounded by limits while others are served, and no client-chosen addresses.
local H = require "spec.helpers.proxy"
local socket = require "socket"
local cjson = require "cjson"
local crypto = require "sp.crypto"
local process = require "spec.helpers.process"
local ws = require "spec.helpers.ws"

describe("request smuggling vectors", function()
    local up, px

    setup(function()
        up = H.upstream{ name = "victim" }
        px = H.start{ sandboxes = { H.sandbox("a", "b", up.port) } }
    end)

    teardown(function()
        H.stop_all()
    end)

    local P = "POST /a/b/echo HTTP/1.1\r\nHost: x\r\n"
    local vectors = {
        { "CL.TE", P .. "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX" },
        { "TE.CL", P .. "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\nGPOST / HTTP/1.1\r\n\r\n0\r\n\r\n" },
        { "TE: xchunked", P .. "Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" },
        { "TE with a leading space in the value then CL", P .. "Transfer-Encoding:  chunked\r\nContent-Length: 3\r\n\r\nabc" },
        { "TE chunked twice", P .. "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n" },
        { "TE identity", P .. "Transfer-Encoding: identity\r\n\r\n" },
        { "TE with a vertical tab", P .. "Transfer-Encoding: chunked\11\r\n\r\n0\r\n\r\n" },
        { "a space before the colon", P .. "Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n" },
        { "duplicate Content-Length", P .. "Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd" },
        { "equal duplicate Content-Length", P .. "Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc" },
        { "Content-Length with a plus", P .. "Content-Length: +3\r\n\r\nabc" },
        { "negative Content-Length", P .. "Content-Length: -3\r\n\r\n" },
        { "hex Content-Length", P .. "Content-Length: 0x3\r\n\r\nabc" },
        { "a Content-Length list", P .. "Content-Length: 3, 3\r\n\r\nabc" },
        { "a huge chunk size", P .. "Transfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\nx\r\n0\r\n\r\n" },
        { "a chunk size with a space", P .. "Transfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n" },
        { "a chunk without its CRLF", P .. "Transfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n" },
        { "an oversized chunk extension", P .. "Transfer-Encoding: chunked\r\n\r\n3;" .. string.rep("e", 4000) .. "=1\r\nabc\r\n0\r\n\r\n" },
        { "obs-fold", "GET /a/b/echo HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\tfolded\r\n\r\n" },
        { "a bare LF", "GET /a/b/echo HTTP/1.1\nHost: x\n\n" },
        { "a bare CR in a value", "GET /a/b/echo HTTP/1.1\r\nHost: x\r\nX-A: 1\r2\r\n\r\n" },
        { "NUL in the target", "GET /a/b/e\0cho HTTP/1.1\r\nHost: x\r\n\r\n" },
        { "NUL in a header value", "GET /a/b/echo HTTP/1.1\r\nHost: x\r\nX-A: 1\0\r\n\r\n" },
        { "HTTP/0.9", "GET /a/b/echo\r\n" },
        { "an absolute-form target", "GET http://127.0.0.1/a/b/echo HTTP/1.1\r\nHost: x\r\n\r\n" },
        { "an invalid method", "G(T /a/b/echo HTTP/1.1\r\nHost: x\r\n\r\n" },
        { "a lowercase method", "get /a/b/echo HTTP/1.1\r\nHost: x\r\n\r\n" },
        { "CONNECT", "CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: x\r\n\r\n" },
        { "HTTP/1.1 without Host", "GET /a/b/echo HTTP/1.1\r\n\r\n" },
        { "two Host headers", "GET /a/b/echo HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n" },
        { "a space in the target", "GET /a/b/ec ho HTTP/1.1\r\nHost: x\r\n\r\n" },
        { "Upgrade with a body", "GET /a/b/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\nContent-Length: 3\r\n\r\nabc" },
        -- more of each class (issue 10); Connection-listed framing headers and obs-fold forms
        -- are in smuggling_spec.lua
        { "an overflowing Content-Length", P .. "Content-Length: 99999999999999999999999\r\n\r\nabc" },
        { "a Content-Length with a trailing letter", P .. "Content-Length: 3a\r\n\r\nabc" },
        { "a Content-Length with an inner space", P .. "Content-Length: 1 2\r\n\r\nabc" },
        { "a tab before the colon", P .. "Content-Length\t: 3\r\n\r\nabc" },
        { "NUL in a header name", "GET /a/b/echo HTTP/1.1\r\nHost: x\r\nX-\0A: 1\r\n\r\n" },
        { "a chunk size with a sign", P .. "Transfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n" },
        { "a chunk size overflowing 64 bits", P .. "Transfer-Encoding: chunked\r\n\r\n10000000000000000\r\nx\r\n0\r\n\r\n" },
        { "bare LF chunk framing", P .. "Transfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n" },
        { "TE: chunked then CL in a second request", "GET /a/b/echo HTTP/1.1\r\nHost: x\r\n\r\n" .. P .. "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n" },
    }

    for _, v in ipairs(vectors) do
        it(v[1] .. ": 400, closed, nothing forwarded", function()
            if v[1]:find("second request", 1, true) then
                -- the first, well-formed request is answered; the second is refused
                local before = up.stats().requests
                local c = assert(px:connect{ timeout = 5 })
                assert(c:send_raw(v[2]))
                assert.are.equal(200, assert(c:read_response{ timeout = 5 }).status)
                assert.are.equal(400, assert(c:read_response{ timeout = 5 }).status)
                assert.is_true(c:closed_by_peer(3))
                c:close()
                assert.are.equal(before + 2, up.stats().requests)
                return
            end
            local before = up.stats().requests
            local r, err, closed = px:raw(v[2])
            assert.is_truthy(r, err)
            assert.are.equal(400, r.status)
            assert.is_true(closed)
            assert.are.equal(before + 1, up.stats().requests) -- only the stats call
        end)
    end

    it("forwards a request that follows the rules, byte for byte", function()
        local r, err, closed = px:raw(P .. "Content-Length: 3\r\nConnection: close\r\n\r\nabc")
        assert.is_truthy(r, err)
        assert.are.equal(200, r.status)
        assert.are.equal("abc", cjson.decode(r.body).body)
        assert.is_true(closed)
    end)
end)

describe("hostile sandbox responses", function()
    local px, port, srv

    setup(function()
        port = assert(H.net.free_port())
        srv = assert(socket.bind("127.0.0.1", port))
        srv:settimeout(5)
        px = H.start{ sandboxes = { H.sandbox("h", "s", port) } }
    end)

    teardown(function()
        srv:close()
        H.stop_all()
    end)

    -- Sends a request through the proxy; plays the sandbox with `answer`; returns the client's
    -- response (or nil, err) and whether the proxy closed the sandbox connection.
    local function exchange(answer)
        local c = assert(px:connect{ timeout = 5 })
        assert(c:send_raw("GET /h/s/x HTTP/1.1\r\nHost: x\r\n\r\n"))
        local s = assert(srv:accept())
        s:settimeout(5)
        repeat
            local line = assert(s:receive("*l"))
        until line == ""
        s:send(answer)
        local r, err = c:read_response{ timeout = 5 }
        s:settimeout(3)
        local _, rerr = s:receive(1)
        s:close()
        c:close()
        return r, err, rerr == "closed"
    end

    local bad = {
        { "Content-Length and Transfer-Encoding", "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" },
        { "two different Content-Lengths", "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd" },
        { "a negative Content-Length", "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n" },
        { "an invalid status line", "HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n" },
        { "not HTTP at all", "SSH-2.0-OpenSSH\r\n\r\n" },
        { "NUL in a header", "HTTP/1.1 200 OK\r\nX-A: 1\0\r\nContent-Length: 0\r\n\r\n" },
        { "obs-fold in a header", "HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 0\r\n\r\n" },
        { "a header block over the limit", "HTTP/1.1 200 OK\r\nX-Big: " .. string.rep("b", 70000) .. "\r\nContent-Length: 0\r\n\r\n" },
        { "101 without an upgrade request", "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n" },
        -- framing the proxy must not trust (issue 10); more in smuggling_spec.lua
        { "Connection: Content-Length", "HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 2\r\n\r\nok" },
        { "a second Connection header listing Transfer-Encoding", "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n" },
        { "Connection: CONTENT-LENGTH on a 204", "HTTP/1.1 204 No Content\r\nConnection: CONTENT-LENGTH\r\n\r\n" },
        { "obs-fold after an empty value", "HTTP/1.1 200 OK\r\nX-A:\r\n folded\r\nContent-Length: 0\r\n\r\n" },
        { "Transfer-Encoding folded after an empty value", "HTTP/1.1 200 OK\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n" },
        { "Content-Length folded after an empty value", "HTTP/1.1 200 OK\r\nContent-Length:\r\n\t2\r\n\r\nok" },
        { "a blank continuation line", "HTTP/1.1 200 OK\r\nX-A: 1\r\n \r\nContent-Length: 0\r\n\r\n" },
        { "two equal Content-Lengths", "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok" },
        { "a Content-Length list", "HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok" },
        { "an overflowing Content-Length", "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\nok" },
        { "a Content-Length with a plus", "HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok" },
        { "a hex Content-Length", "HTTP/1.1 200 OK\r\nContent-Length: 0x2\r\n\r\nok" },
        { "bare LF line ends", "HTTP/1.1 200 OK\nContent-Length: 2\n\nok" },
        { "a bare CR in a value", "HTTP/1.1 200 OK\r\nX-A: 1\r2\r\nContent-Length: 0\r\n\r\n" },
        { "NUL in the reason phrase", "HTTP/1.1 200 O\0K\r\nContent-Length: 0\r\n\r\n" },
        { "a space before the colon", "HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok" },
        { "an overflowing chunk size", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\nx\r\n0\r\n\r\n" },
        { "a chunk size with a sign", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\nok\r\n0\r\n\r\n" },
        { "a chunk without its CRLF", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokX\r\n0\r\n\r\n" },
        { "an HTTP/2 status line", "HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n" },
    }
    for _, b in ipairs(bad) do
        it(b[1] .. ": 502 and the connection is not reused", function()
            local r, err, closed = exchange(b[2])
            assert.is_truthy(r, err)
            assert.are.equal(502, r.status)
            assert.is_true(closed)
        end)
    end

    it("relays a 204 without the body a sandbox sent with it and does not reuse the connection", function()
        local r, err, closed = exchange("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello")
        assert.is_truthy(r, err)
        assert.are.equal(204, r.status)
        assert.are.equal("", r.body)
        assert.is_nil(r.headers["content-length"])
        assert.is_true(closed)
    end)

    it("does not read a body after a 1xx that declares one", function()
        local r, err = exchange("HTTP/1.1 103 Early Hints\r\nContent-Length: 5\r\n\r\n"
            .. "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        assert.is_truthy(r, err)
        assert.are.equal(200, r.status)
        assert.are.equal("ok", r.body)
    end)

    it("does not reuse a connection that sent bytes after the response", function()
        local r, err, closed = exchange("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA")
        assert.is_truthy(r, err)
        assert.are.equal(200, r.status)
        assert.are.equal("ok", r.body)
        assert.is_true(closed)
    end)

    it("closes the client connection on a bad chunk after the head went out", function()
        local r, err = exchange("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n")
        if r then
            assert.is_true(r.status == 502)
        else
            assert.matches("protocol error", err)
        end
    end)
end)

describe("paths that must not cross prefixes", function()
    local alice_up, bob_up, px

    setup(function()
        alice_up = H.upstream{ name = "alice" }
        bob_up = H.upstream{ name = "bob" }
        local dir = H.tmpdir()
        assert(process.write_file(dir .. "/keys.json", cjson.encode({ keys = {
            { user = "alice", sha256 = crypto.hex(crypto.sha256("alice-key")) } } })))
        px = H.start{ sandboxes = { H.sandbox("alice", "sb", alice_up.port),
            H.sandbox("bob", "sb", bob_up.port, { namespace = "team-b" }),
            H.sandbox("bob", "other", bob_up.port, { namespace = "team-b" }) },
            config = ("return { auth = { keys_file = %q } }"):format(dir .. "/keys.json") }
    end)

    teardown(function()
        H.stop_all()
    end)

    -- Every row gets an answer with a known status: the proxy's own refusal (no upstream
    -- name), or alice's sandbox (which answers 404 for a remainder it does not know). A row
    -- without an answer fails: a crashed proxy cannot pass this table.
    local BAD, NOT_BOB = 400, 403
    local tricky = {
        { "/bob/sb/echo", NOT_BOB }, { "/alice/../bob/sb/echo", BAD },
        { "/alice/%2e%2e/bob/sb/echo", BAD }, { "/alice/%2E%2E/bob/sb/echo", BAD },
        { "/alice%2fbob/sb/echo", BAD }, { "/alice%2Fbob/sb/echo", BAD }, { "//bob/sb/echo", BAD },
        { "/./bob/sb/echo", BAD }, { "/%2e/bob/sb/echo", BAD }, { "/%2Fbob/sb/echo", BAD },
        { "/alice/sb%2f..%2f..%2fbob%2fsb/echo", BAD }, { "/bob%00/sb/echo", BAD },
        { "/bo%62/sb/echo", NOT_BOB }, { "/ALICE/../bob/sb/echo", BAD },
        { "/alice/./../bob/sb/echo", BAD }, { "/alice/sb/../../bob/sb/echo", 404, "alice" },
        { "/alice/sb/..%2f..%2fbob/sb/echo", 404, "alice" }, { "/%62ob/other/echo", NOT_BOB },
        { "/alice/%252e%252e/bob/sb/echo", BAD }, { "/alice;/../bob/sb/echo", BAD },
        { "/alice/sb?/../../bob/sb/echo", 200, "alice" }, { "/alice/sb#/../../bob/sb", 404 },
    }
    for _, row in ipairs(tricky) do
        local path, status, upstream = row[1], row[2], row[3]
        it(("never reaches bob's sandboxes with alice's key: %s -> %d"):format(path, status), function()
            local r, err = px:get(path, { { "Authorization", "Bearer alice-key" } })
            assert.is_truthy(r, err)
            assert.are.equal(status, r.status, r.body)
            assert.are.equal(upstream, r.headers["x-upstream-name"]) -- nil: the proxy answered
        end)
    end

    it("is alive and serving after the tricky paths", function()
        assert.is_true(px.proc:alive())
        local r = assert(px:get("/alice/sb/echo", { { "Authorization", "Bearer alice-key" } }))
        assert.are.equal(200, r.status)
        assert.are.equal("alice", r.headers["x-upstream-name"])
    end)

    it("keeps the forwarded remainder in its raw form", function()
        local r = assert(px:get("/alice/sb/echo/..%2f%2e%2e/x?y=%2F",
            { { "Authorization", "Bearer alice-key" } }))
        assert.are.equal(200, r.status, r.body)
        assert.are.equal("/echo/..%2f%2e%2e/x?y=%2F", cjson.decode(r.body).target)
    end)

    it("ignores anything a client sends to choose an address", function()
        local r = assert(px:get("/alice/sb/echo", { { "Authorization", "Bearer alice-key" },
            { "X-Sandbox-Pod-IP", "127.0.0.1" }, { "X-Forwarded-Host", "bob.sb" },
            { "Host", "127.0.0.1:" .. bob_up.port } }))
        assert.are.equal("alice", r.headers["x-upstream-name"], r.body)
    end)
end)

describe("slow clients and floods", function()
    teardown(function()
        H.stop_all()
    end)

    it("times out slowloris heads and bodies while serving others", function()
        local up = H.upstream{ name = "slow" }
        local px = H.start{ sandboxes = { H.sandbox("a", "b", up.port) },
            set = { header_timeout = 1, body_timeout = 1 } }
        local slow = {}
        for i = 1, 20 do
            local c = assert(px:connect{ timeout = 5 })
            assert(c:send_raw(i % 2 == 0 and "GET /a/b/echo HTTP/1.1\r\nHo"
                or "POST /a/b/sink HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab"))
            slow[i] = c
        end
        local t0 = socket.gettime()
        -- others are served meanwhile
        for _ = 1, 20 do
            assert.are.equal(200, assert(px:get("/a/b/echo")).status)
        end
        -- one byte now and then does not keep a head alive past header_timeout
        for _, c in ipairs(slow) do
            c:send_raw("x")
        end
        for _, c in ipairs(slow) do
            assert.is_true(c:closed_by_peer(5))
            c:close()
        end
        assert.is_true(socket.gettime() - t0 < 5)
    end)

    it("caps connections per client address and serves other addresses", function()
        local up = H.upstream{ name = "flood" }
        local px = H.start{ sandboxes = { H.sandbox("a", "b", up.port) },
            set = { max_connections_per_ip = 10 } }
        local held = {}
        for i = 1, 10 do
            held[i] = assert(px:connect{ timeout = 5 })
            assert.are.equal(200, assert(held[i]:request{ path = "/a/b/echo" }).status)
        end
        local extra = assert(px:connect{ timeout = 5 })
        assert.is_true(extra:closed_by_peer(3))
        extra:close()
        -- another address (127.0.0.2 is loopback too) is not affected
        local s = socket.tcp()
        assert(s:bind("127.0.0.2", 0))
        s:settimeout(5)
        assert(s:connect("127.0.0.1", px.port))
        assert(s:send("GET /a/b/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        local status = s:receive("*l")
        assert.matches("^HTTP/1.1 200", status)
        s:close()
        for _, c in ipairs(held) do
            c:close()
        end
        H.net.wait_until(function()
            local r = px:get("/a/b/echo")
            return r and r.status == 200
        end, 5)
    end)

    -- A client socket from 127.0.0.2 (loopback too): a second client address on this host.
    local function connect_from(src, port)
        local s = socket.tcp()
        assert(s:bind(src, 0))
        s:settimeout(5)
        assert(s:connect("127.0.0.1", port))
        return s
    end

    local function served(s)
        assert(s:send("GET /a/b/echo HTTP/1.1\r\nHost: x\r\n\r\n"))
        local status = s:receive("*l")
        local len
        repeat
            local line = s:receive("*l")
            len = len or tonumber(line and line:match("^[Cc]ontent%-[Ll]ength:%s*(%d+)"))
        until not line or line == ""
        if len and len > 0 then
            s:receive(len)
        end
        return status and status:match("^HTTP/1.1 200") ~= nil
    end

    it("does not cap a trusted proxy's address, and still caps the others", function()
        local up = H.upstream{ name = "lb" }
        local px = H.start{ sandboxes = { H.sandbox("a", "b", up.port) },
            set = { max_connections_per_ip = 3, trusted_proxies = "127.0.0.2/32,fd00::/8" } }
        -- the load balancer at 127.0.0.2 carries many clients: 8 connections, all served
        local lb = {}
        for i = 1, 8 do
            lb[i] = connect_from("127.0.0.2", px.port)
            assert.is_true(served(lb[i]), "trusted connection " .. i)
        end
        -- 127.0.0.1 is an ordinary client: 3, then the 4th is closed without an answer
        local held = {}
        for i = 1, 3 do
            held[i] = connect_from("127.0.0.1", px.port)
            assert.is_true(served(held[i]), "client connection " .. i)
        end
        local extra = assert(px:connect{ timeout = 5 })
        assert.is_true(extra:closed_by_peer(3))
        extra:close()
        px:wait_log(function(l)
            return l.msg == "connection refused: max_connections_per_ip reached"
                and l.client == "127.0.0.1" and l.limit == 3
        end)
        for _, c in ipairs(held) do
            c:close()
        end
        for _, c in ipairs(lb) do
            c:close()
        end
    end)

    it("caps connections per address by default (max_connections_per_ip = 1000)", function()
        local p = assert(H.process.spawn{ cmd = { H.BIN, "--help" }, stdout = H.tmpdir() .. "/out" })
        assert.are.equal(0, p:wait(10))
        local line = p:read_stdout():match("\n%s*max_connections_per_ip [^\n]*")
        assert.matches("%(default: 1000%)$", line)
    end)

    it("caps open tunnels and keeps serving plain requests", function()
        local up = H.upstream{ name = "ws-flood" }
        local px = H.start{ sandboxes = { H.sandbox("a", "b", up.port) }, set = { max_tunnels = 3 } }
        local open = {}
        for i = 1, 3 do
            open[i] = assert(ws.connect{ host = "127.0.0.1", port = px.port, path = "/a/b/ws" })
        end
        local c, err, resp = ws.connect{ host = "127.0.0.1", port = px.port, path = "/a/b/ws" }
        assert.is_nil(c, err)
        assert.are.equal(503, resp.status)
        assert.are.equal(200, assert(px:get("/a/b/echo")).status)
        open[1]:close()
        H.net.wait_until(function()
            local c2 = ws.connect{ host = "127.0.0.1", port = px.port, path = "/a/b/ws" }
            if c2 then
                c2:close()
                return true
            end
        end, 5)
        for i = 2, 3 do
            open[i]:close()
        end
    end)
end)
