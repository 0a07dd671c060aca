-- Proxying basics against the real binary and spec/fixtures/upstream.py: the path and query
-- forwarded exactly, headers added and removed, keep-alive on both sides, pipelining,
-- HTTP/1.0, bodiless responses and response framing.
local H = require "spec.helpers.proxy"
local cjson = require "cjson"

local function header_map(list)
    local t = {}
    for _, h in ipairs(list) do
        t[h[1]:lower()] = t[h[1]:lower()] and (t[h[1]:lower()] .. ", " .. h[2]) or h[2]
    end
    return t
end

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
        assert.are.equal("up1", r.headers["x-upstream-name"])
    end)

    it("forwards a bare sandbox path as /, with its query", function()
        local e = cjson.decode(assert(px:get("/alice/sb1")).body)
        assert.are.equal("Sandbox Runtime is active.", e.message)
        e = cjson.decode(assert(px:get("/alice/sb1?x=1")).body)
        assert.are.equal("Sandbox Runtime is active.", e.message)
    end)

    it("answers 404 for an unknown sandbox and 503 for one not ready", function()
        local r = assert(px:get("/alice/nope/x"))
        assert.are.equal(404, r.status)
        assert.are.equal("application/json", r.headers["content-type"])
        assert.are.same({ error = "sandbox not found", path = "alice/nope" }, cjson.decode(r.body))
        assert.is_truthy(r.headers["x-request-id"])
        r = assert(px:get("/bob/starting/x"))
        assert.are.equal(503, r.status)
        assert.are.equal("2", r.headers["retry-after"])
        local b = cjson.decode(r.body)
        assert.are.equal("sandbox not ready", b.error)
        assert.are.equal("DependenciesNotReady", b.reason)
        assert.are.equal("bob/starting", b.path)
    end)

    it("answers 400 with the expected form for a path without user and sandbox", function()
        local r = assert(px:get("/justone"))
        assert.are.equal(400, r.status)
        assert.are.equal("/{user}/{sandbox}/{path} or /{user}/{sandbox}:{port}/{path}",
            cjson.decode(r.body).expected)
    end)

    it("adds X-Forwarded-* and X-Request-Id and removes hop-by-hop request headers", function()
        local r = assert(px:request{ path = "/alice/sb1/echo", headers = {
            { "Host", "proxy.example:8080" },
            { "X-Forwarded-For", "203.0.113.9" },
            { "Connection", "keep-alive, X-Private" },
            { "X-Private", "drop me" },
            { "Keep-Alive", "timeout=5" },
            { "Proxy-Connection", "keep-alive" },
            { "TE", "trailers" },
            { "X-Keep", "yes" },
            { "X-Request-Id", "client-chosen" },
        } })
        assert.are.equal(200, r.status)
        local e = cjson.decode(r.body)
        local h = header_map(e.headers)
        assert.are.equal("203.0.113.9, 127.0.0.1", h["x-forwarded-for"])
        assert.are.equal("http", h["x-forwarded-proto"])
        assert.are.equal("proxy.example:8080", h["x-forwarded-host"])
        assert.are.equal("proxy.example:8080", h["host"])
        assert.are.equal("yes", h["x-keep"])
        assert.is_nil(h["x-private"])
        assert.is_nil(h["keep-alive"])
        assert.is_nil(h["proxy-connection"])
        assert.is_nil(h["te"])
        assert.is_nil(h["connection"])
        assert.are.equal(r.headers["x-request-id"], h["x-request-id"])
        assert.are_not.equal("client-chosen", h["x-request-id"])
    end)

    it("removes hop-by-hop response headers and keeps end-to-end ones", function()
        local r = assert(px:get("/alice/sb1/hop"))
        assert.are.equal(200, r.status)
        assert.are.equal("yes", r.headers["x-end-to-end"])
        assert.is_nil(r.headers["x-hop"])
        assert.is_nil(r.headers["keep-alive"])
        assert.is_nil(r.headers["proxy-connection"])
    end)

    it("keeps client connections alive and reuses pooled upstream connections", function()
        local c = assert(px:connect())
        local ids = {}
        for i = 1, 3 do
            local r = assert(c:request{ path = "/alice/sb1/echo" })
            assert.are.equal(200, r.status)
            assert.is_false(r.closed)
            ids[i] = cjson.decode(r.body).conn_id
        end
        c:close()
        assert.are.equal(ids[1], ids[2])
        assert.are.equal(ids[2], ids[3])
    end)

    it("answers pipelined requests in order", function()
        local c = assert(px:connect())
        local raw = ""
        for i = 1, 4 do
            raw = raw .. "GET /alice/sb1/echo?n=" .. i .. " HTTP/1.1\r\nHost: x\r\n\r\n"
        end
        raw = raw .. "GET /alice/nope/x HTTP/1.1\r\nHost: x\r\n\r\n"
        raw = raw .. "HEAD /alice/sb1/echo?n=6 HTTP/1.1\r\nHost: x\r\n\r\n"
        assert(c:send_raw(raw))
        for i = 1, 4 do
            local r = assert(c:read_response{ method = "GET" })
            assert.are.equal(200, r.status)
            assert.are.equal("/echo?n=" .. i, cjson.decode(r.body).target)
        end
        local r = assert(c:read_response{ method = "GET" })
        assert.are.equal(404, r.status)
        r = assert(c:read_response{ method = "HEAD" })
        assert.are.equal(200, r.status)
        assert.are.equal("", r.body)
        c:close()
    end)

    it("serves HTTP/1.0 clients and closes unless asked to keep alive", function()
        local r = assert(px:request{ path = "/alice/sb1/echo", http_version = "1.0" })
        assert.are.equal(200, r.status)
        assert.is_true(r.closed)
        local c = assert(px:connect())
        r = assert(c:request{ path = "/alice/sb1/echo", http_version = "1.0",
            headers = { { "Connection", "keep-alive" } } })
        assert.are.equal(200, r.status)
        assert.is_false(r.closed)
        assert.are.equal("keep-alive", r.headers["connection"])
        c:close()
    end)

    it("sends no body for HEAD, 204 and 304", function()
        local c = assert(px:connect())
        local r = assert(c:request{ method = "HEAD", path = "/alice/sb1/bytes/1000" })
        assert.are.equal(200, r.status)
        assert.are.equal("1000", r.headers["content-length"])
        assert.are.equal("", r.body)
        r = assert(c:request{ path = "/alice/sb1/status/204" })
        assert.are.equal(204, r.status)
        assert.are.equal("", r.body)
        r = assert(c:request{ path = "/alice/sb1/status/304" })
        assert.are.equal(304, r.status)
        assert.are.equal("", r.body)
        -- the connection is still in step after bodiless responses
        r = assert(c:request{ path = "/alice/sb1/echo" })
        assert.are.equal(200, r.status)
        c:close()
    end)

    it("passes chunked responses through as chunks", function()
        local r = assert(px:get("/alice/sb1/bytes/100000?chunked=1"))
        assert.are.equal(200, r.status)
        assert.are.equal("chunked", r.framing)
        assert.are.equal(100000, #r.body)
        for i = 1, #r.body, 997 do
            assert.are.equal((i - 1) % 251, r.body:byte(i))
        end
    end)

    it("decodes a chunked response for an HTTP/1.0 client and closes", function()
        local r = assert(px:request{ path = "/alice/sb1/bytes/50000?chunked=1",
            http_version = "1.0" })
        assert.are.equal(200, r.status)
        assert.are.equal("eof", r.framing)
        assert.are.equal(50000, #r.body)
        assert.is_true(r.closed)
    end)

    it("passes an end-of-connection delimited body and closes the client connection", function()
        local r = assert(px:get("/alice/sb1/noclen?n=30000"))
        assert.are.equal(200, r.status)
        assert.are.equal(30000, #r.body)
        assert.is_true(r.closed)
    end)

    it("returns the sandbox's own error statuses untouched", function()
        local r = assert(px:get("/alice/sb1/status/418"))
        assert.are.equal(418, r.status)
        r = assert(px:get("/alice/sb1/nothing-here"))
        assert.are.equal(404, r.status)
        assert.are.equal("not found", cjson.decode(r.body).message)
    end)
end)

describe("the end of a keep-alive connection", function()
    local up, px

    setup(function()
        up = H.upstream{ name = "up-ka" }
        px = H.start{ sandboxes = { H.sandbox("alice", "sb1", up.port) },
            set = { keepalive_requests = 3 } }
    end)

    teardown(function()
        H.stop_all()
    end)

    -- A client must learn from the response that the connection ends: without
    -- "Connection: close" it would send its next request into a closing socket.
    it("announces the last proxied response of keepalive_requests with Connection: close", function()
        local c = assert(px:connect())
        for i = 1, 2 do
            local r = assert(c:request{ path = "/alice/sb1/echo" })
            assert.are.equal(200, r.status)
            assert.is_nil(r.headers["connection"], "response " .. i)
            assert.is_false(r.closed)
        end
        local r = assert(c:request{ path = "/alice/sb1/echo" })
        assert.are.equal(200, r.status)
        assert.are.equal("close", r.headers["connection"])
        assert.is_true(c:closed_by_peer(5))
        c:close()
    end)

    it("announces the last local response too", function()
        local c = assert(px:connect())
        assert.is_nil(assert(c:request{ path = "/health" }).headers["connection"])
        assert.is_nil(assert(c:request{ path = "/alice/nope/x" }).headers["connection"])
        local r = assert(c:request{ path = "/health" })
        assert.are.equal(200, r.status)
        assert.are.equal("close", r.headers["connection"])
        assert.is_true(c:closed_by_peer(5))
        c:close()
    end)

    it("says Connection: close when the sandbox answers before the request body is read", function()
        local c = assert(px:connect())
        assert(c:send_raw("POST /alice/sb1/early/413 HTTP/1.1\r\nHost: x\r\n"
            .. "Content-Length: 100000\r\n\r\n" .. string.rep("a", 100)))
        local r = assert(c:read_response{ method = "POST" })
        assert.are.equal(413, r.status)
        assert.are.equal("close", r.headers["connection"])
        assert.is_true(c:closed_by_peer(5))
        c:close()
    end)
end)
