-- Bodies in both directions: Content-Length and chunked uploads, Expect: 100-continue, a
-- 1 GiB upload whose proxy RSS stays bounded, 1 MiB downloads, SSE events arriving one by one,
-- and a slow client that the proxy must not buffer for.
local H = require "spec.helpers.proxy"
local socket = require "socket"
local cjson = require "cjson"

-- The fixture's byte pattern (byte i = i % 251), produced in blocks.
local function pattern(n)
    local t = {}
    for i = 0, 250 do
        t[#t + 1] = string.char(i)
    end
    local block = table.concat(t)
    local reps = math.ceil(n / 251)
    return (block:rep(reps)):sub(1, n)
end

describe("streaming", function()
    local up, px

    setup(function()
        up = H.upstream{ name = "stream" }
        px = H.start{ sandboxes = { H.sandbox("alice", "sb", up.port) } }
    end)

    teardown(function()
        H.stop_all()
    end)

    it("forwards a Content-Length upload byte for byte", function()
        local body = pattern(300000)
        local r = assert(px:request{ method = "POST", path = "/alice/sb/sink", body = body,
            timeout = 20 })
        assert.are.equal(200, r.status)
        local e = cjson.decode(r.body)
        assert.are.equal(300000, e.bytes)
        local want = cjson.decode(assert(px:get("/alice/sb/pattern-sha/300000")).body).sha256
        assert.are.equal(want, e.sha256)
    end)

    it("forwards a chunked upload re-framed in canonical chunks", function()
        local sizes = { 1, 10, 4096, 70000, 3, 100000 }
        local i = 0
        local total = 0
        local r = assert(px:request{ method = "PUT", path = "/alice/sb/echo",
            body_source = function()
                i = i + 1
                if sizes[i] then
                    total = total + sizes[i]
                    return string.rep("x", sizes[i])
                end
            end, timeout = 20 })
        assert.are.equal(200, r.status)
        local e = cjson.decode(r.body)
        assert.are.equal(total, e.body_length)
        local te
        for _, h in ipairs(e.headers) do
            if h[1]:lower() == "transfer-encoding" then
                te = h[2]
            end
        end
        assert.are.equal("chunked", te)
    end)

    it("handles Expect: 100-continue", function()
        local r = assert(px:request{ method = "POST", path = "/alice/sb/echo", body = "hello",
            headers = { { "Expect", "100-continue" } } })
        assert.are.equal(200, r.status)
        assert.are.equal(1, #r.interim)
        assert.are.equal(100, r.interim[1].status)
        assert.are.equal("hello", cjson.decode(r.body).body)
    end)

    it("answers a refused request with a body without reading it (Expect)", function()
        local r = assert(px:request{ method = "POST", path = "/alice/nope/x", body = "hello",
            headers = { { "Expect", "100-continue" } } })
        assert.are.equal(404, r.status)
        assert.are.equal(0, #r.interim)
    end)

    it("downloads 1 MiB intact, with Content-Length", function()
        local r = assert(px:request{ path = "/alice/sb/bytes/1048576", timeout = 20 })
        assert.are.equal(200, r.status)
        assert.are.equal("1048576", r.headers["content-length"])
        assert.are.equal(1048576, #r.body)
        assert.are.equal(pattern(1048576), r.body)
    end)

    it("streams SSE events one by one as they are produced", function()
        local resp = assert(H.http.stream{ port = px.port, path = "/alice/sb/sse?n=5&interval_ms=300",
            timeout = 10 })
        assert.are.equal(200, resp.status)
        assert.are.equal("text/event-stream", resp.headers["content-type"])
        local events, err = H.http.sse_events(resp, 5, 10)
        assert.are.equal(5, #events, tostring(err))
        for i = 2, 5 do
            -- each event arrives about one interval after the previous one, not all at the end
            local gap = events[i].t - events[i - 1].t
            assert.is_true(gap > 0.15, "event " .. i .. " arrived " .. gap .. " s after the previous")
        end
        assert.is_true(events[5].t - events[1].t > 0.9)
        resp:close()
    end)

    it("streams a slow body as it arrives", function()
        local resp = assert(H.http.stream{ port = px.port,
            path = "/alice/sb/slow-body?chunks=4&interval_ms=300", timeout = 10 })
        assert.are.equal(200, resp.status)
        local t0 = socket.gettime()
        local first = assert(resp:next_chunk(5))
        assert.is_true(#first > 0)
        assert.is_true(socket.gettime() - t0 < 0.6, "the first chunk was held back")
        assert(resp:read_all(10))
    end)

    it("streams a 1 GiB upload with bounded proxy memory", function()
        local block = string.rep("0123456789abcdef", 16384) -- 256 KiB
        local sent, total = 0, 1024 * 1024 * 1024
        local base = assert(px:rss_kib())
        local peak = base
        local r = assert(px:request{ method = "POST", path = "/alice/sb/sink",
            headers = { { "Content-Length", tostring(total) } },
            body_source = function()
                if sent >= total then
                    return nil
                end
                sent = sent + #block
                if sent % (64 * 1024 * 1024) == 0 then
                    peak = math.max(peak, px:rss_kib() or 0)
                end
                return block
            end, timeout = 300 })
        assert.are.equal(200, r.status)
        assert.are.equal(total, cjson.decode(r.body).bytes)
        peak = math.max(peak, px:rss_kib() or 0)
        -- one 16 KiB client buffer and one 64 KiB upstream buffer: growth far below 32 MiB
        assert.is_true(peak - base < 32 * 1024,
            "proxy RSS grew from " .. base .. " to " .. peak .. " KiB")
        print(("\n1 GiB upload: proxy RSS %d KiB before, peak %d KiB"):format(base, peak))
    end)
end)
