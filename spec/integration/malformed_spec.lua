-- Malformed requests get 400 (or the limit's status) and a closed connection, and nothing
-- reaches the sandbox. Limits: request target (414), header bytes and count (431), body size
-- (413), header/keep-alive timeouts, and the connection cap.
local H = require "spec.helpers.proxy"
local cjson = require "cjson"
local socket = require "socket"

describe("malformed requests", function()
    local up, px

    setup(function()
        up = H.upstream{ name = "victim" }
        px = H.start{ sandboxes = { H.sandbox("alice", "sb", up.port) },
            set = { max_url_size = 256, max_header_size = 2048, max_headers = 20,
                max_body_size = 100000 } }
    end)

    teardown(function()
        H.stop_all()
    end)

    local cases = {
        { "an invalid method", "G@T /alice/sb/echo HTTP/1.1\r\nHost: x\r\n\r\n" },
        { "a bad version", "GET /alice/sb/echo HTTP/9.9\r\nHost: x\r\n\r\n" },
        { "HTTP/0.9", "GET /alice/sb/echo\r\n\r\n" },
        { "a space in a header name", "GET /alice/sb/echo HTTP/1.1\r\nHost: x\r\nBad Name: y\r\n\r\n" },
        { "obs-fold", "GET /alice/sb/echo HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n" },
        { "a bare LF line ending", "GET /alice/sb/echo HTTP/1.1\nHost: x\n\n" },
        { "a bare CR", "GET /alice/sb/echo HTTP/1.1\r\nHost: x\rX: y\r\n\r\n" },
        { "NUL in a header value", "GET /alice/sb/echo HTTP/1.1\r\nHost: x\r\nX: a\0b\r\n\r\n" },
        { "Content-Length and Transfer-Encoding together",
            "POST /alice/sb/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" },
        { "duplicate Content-Length",
            "POST /alice/sb/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc" },
        { "a negative Content-Length",
            "POST /alice/sb/echo HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n" },
        { "Transfer-Encoding other than chunked last",
            "POST /alice/sb/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n" },
        { "an invalid chunk size",
            "POST /alice/sb/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n" },
        { "a missing Host on HTTP/1.1", "GET /alice/sb/echo HTTP/1.1\r\n\r\n" },
        { "two Host headers", "GET /alice/sb/echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n" },
        { "an absolute-form target", "GET http://evil.example/alice/sb/echo HTTP/1.1\r\nHost: x\r\n\r\n" },
        { "an asterisk target", "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n" },
        { "CONNECT", "CONNECT 10.0.0.1:22 HTTP/1.1\r\nHost: x\r\n\r\n" },
    }

    for _, case in ipairs(cases) do
        it("rejects " .. case[1] .. " with 400 and closes", function()
            local before = up.stats().requests
            local r, err, closed = px:raw(case[2])
            assert.is_truthy(r, err)
            assert.are.equal(400, r.status)
            assert.are.equal("application/json", r.headers["content-type"])
            assert.is_truthy(cjson.decode(r.body).error)
            assert.is_true(closed)
            -- __stats itself is one request
            assert.are.equal(before + 1, up.stats().requests)
        end)
    end

    it("answers 414 for a request target over max_url_size", function()
        local r, _, closed = px:raw("GET /alice/sb/" .. string.rep("a", 400) .. " HTTP/1.1\r\nHost: x\r\n\r\n")
        assert.are.equal(414, r.status)
        assert.is_true(closed)
    end)

    it("answers 431 for headers over max_header_size", function()
        local r, _, closed = px:raw("GET /alice/sb/echo HTTP/1.1\r\nHost: x\r\nX-Big: "
            .. string.rep("b", 3000) .. "\r\n\r\n")
        assert.are.equal(431, r.status)
        assert.is_true(closed)
    end)

    it("answers 431 for more than max_headers headers", function()
        local h = {}
        for i = 1, 25 do
            h[#h + 1] = "X-H" .. i .. ": v\r\n"
        end
        local r, _, closed = px:raw("GET /alice/sb/echo HTTP/1.1\r\nHost: x\r\n" .. table.concat(h) .. "\r\n")
        assert.are.equal(431, r.status)
        assert.is_true(closed)
    end)

    it("answers 413 for a declared body over max_body_size", function()
        local r, _, closed = px:raw("POST /alice/sb/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100001\r\n\r\n")
        assert.are.equal(413, r.status)
        assert.is_true(closed)
    end)

    it("accepts a body of exactly max_body_size", function()
        local r = assert(px:request{ method = "POST", path = "/alice/sb/sink",
            body = string.rep("z", 100000) })
        assert.are.equal(200, r.status)
        assert.are.equal(100000, cjson.decode(r.body).bytes)
    end)

    it("keeps serving after all of that", function()
        local r = assert(px:get("/alice/sb/echo"))
        assert.are.equal(200, r.status)
    end)
end)

describe("client timeouts and connection limits", function()
    local up, px

    setup(function()
        up = H.upstream{ name = "t" }
        px = H.start{ sandboxes = { H.sandbox("alice", "sb", up.port) },
            set = { header_timeout = 0.5, keepalive_timeout = 0.5, body_timeout = 0.5,
                max_connections = 5 } }
    end)

    teardown(function()
        H.stop_all()
    end)

    it("answers 408 and closes when the head does not complete in header_timeout", function()
        local c = assert(px:connect{ timeout = 5 })
        local t0 = socket.gettime()
        assert(c:send_raw("GET /alice/sb/echo HTTP/1.1\r\nHost: x\r\n"))
        local r = assert(c:read_response{ timeout = 5 })
        assert.are.equal(408, r.status)
        assert.is_true(socket.gettime() - t0 >= 0.4)
        assert.is_true(c:closed_by_peer(3))
        c:close()
    end)

    it("closes an idle keep-alive connection after keepalive_timeout", function()
        local c = assert(px:connect{ timeout = 5 })
        local r = assert(c:request{ path = "/alice/sb/echo" })
        assert.are.equal(200, r.status)
        assert.is_true(c:closed_by_peer(3))
        c:close()
    end)

    it("answers 408 when a body stalls for body_timeout", function()
        local c = assert(px:connect{ timeout = 5 })
        assert(c:send_raw("POST /alice/sb/sink HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"))
        local r = assert(c:read_response{ timeout = 5 })
        assert.are.equal(408, r.status)
        c:close()
    end)

    it("closes connections beyond max_connections at once and serves the others", function()
        local px2 = H.start{ sandboxes = { H.sandbox("alice", "sb", up.port) },
            set = { max_connections = 5 } }
        local conns = {}
        for i = 1, 5 do
            conns[i] = assert(px2:connect{ timeout = 5 })
            -- a request on each makes sure the proxy has accepted it
            assert.are.equal(200, assert(conns[i]:request{ path = "/alice/sb/echo" }).status)
        end
        local extra = assert(px2:connect{ timeout = 5 })
        assert.is_true(extra:closed_by_peer(3))
        extra:close()
        local r = assert(conns[1]:request{ path = "/alice/sb/echo" })
        assert.are.equal(200, r.status)
        for _, c in ipairs(conns) do
            c:close()
        end
        -- once they are gone, new connections are served again
        H.net.wait_until(function()
            local resp = px2:get("/health")
            return resp and resp.status == 200
        end, 5)
    end)
end)
