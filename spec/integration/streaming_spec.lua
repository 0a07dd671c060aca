-- Bodies in both directions: Content-Length and chunked uploads, Expect: 100-continue, a
-- 1 GiB upload whose proxy RSS stays bounded, 1 MiB downloads, SSE events arriving one by one.
-- Backpressure both ways: a sandbox that reads an upload slowly and a client that reads a
-- download slowly are not buffered for (proxy RSS bounded, bytes intact). send_timeout: a
-- client that stops reading is cut off and its sandbox connection released, even while it
-- trickles bytes of its own; a slow client that keeps reading is not (send_timeout bounds each
-- wait for the client, not the download).
-- Memory bounds are generous thresholds on RSS growth, never on time.
local H = require "spec.helpers.proxy"
local socket = require "socket"
local cjson = require "cjson"

local MIB = 1024 * 1024
local SLOW_TOTAL = 128 * MIB    -- the slow transfers: far more than socket buffers hold
local SLOW_RATE = 32 * MIB      -- bytes/s of the slow side: about 4 s for SLOW_TOTAL
local SLOW_GROWTH_KIB = 32 * 1024 -- allowed proxy RSS growth; without backpressure ~100 MiB

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

-- checks that data is the pattern from offset off on; returns true or nil, message
local function is_pattern_at(data, off)
    local ref = pattern(251 * 300) -- 75 KiB
    local pos = 1
    while pos <= #data do
        local n = math.min(#data - pos + 1, #ref - 251)
        local phase = (off + pos - 1) % 251
        if data:sub(pos, pos + n - 1) ~= ref:sub(phase + 1, phase + n) then
            return nil, "bytes differ from the pattern in " .. (off + pos - 1) .. ".." .. (off + pos + n - 2)
        end
        pos = pos + n
    end
    return true
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

    it("stops reading an upload while the sandbox reads slowly: bounded memory, intact", function()
        -- the client sends as fast as it can, the sandbox reads SLOW_RATE
        local block = pattern(251 * 1024) -- a whole number of pattern periods
        local sent = 0
        local base = assert(px:rss_kib())
        local peak = base
        local r = assert(px:request{ method = "POST",
            path = "/alice/sb/sink?rate_kbps=" .. math.floor(SLOW_RATE / 1024),
            headers = { { "Content-Length", tostring(SLOW_TOTAL) } },
            body_source = function()
                if sent >= SLOW_TOTAL then
                    peak = math.max(peak, px:rss_kib() or 0) -- all sent: the most a proxy could hold
                    return nil
                end
                local piece = block:sub(1, math.min(#block, SLOW_TOTAL - sent))
                sent = sent + #piece
                if sent % (4 * MIB) < #piece then
                    peak = math.max(peak, px:rss_kib() or 0)
                end
                return piece
            end, timeout = 120 })
        assert.are.equal(200, r.status)
        local e = cjson.decode(r.body)
        assert.are.equal(SLOW_TOTAL, e.bytes)
        local want = cjson.decode(assert(px:get("/alice/sb/pattern-sha/" .. SLOW_TOTAL)).body)
        assert.are.equal(want.sha256, e.sha256)
        print(("\nslow-sandbox upload: proxy RSS %d KiB before, peak %d KiB"):format(base, peak))
        assert.is_true(peak - base < SLOW_GROWTH_KIB,
            "proxy RSS grew from " .. base .. " to " .. peak .. " KiB")
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

describe("streaming to slow clients", function()
    local up, stall, px

    setup(function()
        up = H.upstream{ name = "slow" }
        stall = H.upstream{ name = "stall" } -- only the stalled download uses it
        px = H.start{ sandboxes = { H.sandbox("alice", "sb", up.port),
            H.sandbox("alice", "stall", stall.port) }, set = { send_timeout = 1 } }
    end)

    teardown(function()
        H.stop_all()
    end)

    it("stops reading from the sandbox while the client reads slowly, and does not cut off a " ..
        "client slower than send_timeout in total: bounded memory, intact", function()
        -- 128 MiB at 32 MiB/s: about 4 s, four times send_timeout, with the proxy waiting for
        -- the client nearly all the time (the sandbox sends far faster)
        local base = assert(px:rss_kib())
        local peak = base
        local resp = assert(H.http.stream{ port = px.port, path = "/alice/sb/bytes/" .. SLOW_TOTAL,
            timeout = 10 })
        assert.are.equal(200, resp.status)
        assert.are.equal(tostring(SLOW_TOTAL), resp.headers["content-length"])
        local got, next_sample = 0, 0
        local t0 = socket.gettime()
        while true do
            local data, err = resp:next_chunk(10)
            if not data then
                assert.is_nil(err, "after " .. got .. " bytes: " .. tostring(err))
                break
            end
            assert(is_pattern_at(data, got))
            got = got + #data
            if got >= next_sample then
                peak = math.max(peak, px:rss_kib() or 0)
                next_sample = got + 4 * MIB
            end
            local ahead = got / SLOW_RATE - (socket.gettime() - t0)
            if ahead > 0 then
                socket.sleep(ahead) -- the slow reader: SLOW_RATE at most
            end
        end
        resp:close()
        assert.are.equal(SLOW_TOTAL, got)
        print(("\nslow-client download: proxy RSS %d KiB before, peak %d KiB"):format(base, peak))
        assert.is_true(peak - base < SLOW_GROWTH_KIB,
            "proxy RSS grew from " .. base .. " to " .. peak .. " KiB")
    end)

    it("closes the connection of a client that stops reading after send_timeout, logs it and " ..
        "releases the sandbox connection", function()
        local total = 256 * MIB -- far more than the socket buffers between the three hold
        local path = "/alice/stall/bytes/" .. total
        -- open counts the stats connection itself (an earlier one may take a moment to go)
        H.net.wait_until(function()
            return stall.stats().open == 1
        end, 10, 0.05, "no connection to the sandbox")
        local resp = assert(H.http.stream{ port = px.port, path = path, timeout = 10 })
        assert.are.equal(200, resp.status)
        H.net.wait_until(function()
            return stall.stats().open == 2
        end, 10, 0.05, "the proxy's connection, busy sending")
        -- the client reads nothing more: the proxy's write waits, then send_timeout ends it
        local line = px:wait_log(function(l)
            return l.path == path and l.error
        end, 20, "stdout")
        assert.are.equal("client timeout", line.error)
        assert.are.equal(200, line.status)
        assert.is_true(line.bytes_out < total)
        -- and one line on stderr for the event, naming the request
        local ev = px:wait_log(function(l)
            return l.msg == "client send timeout" and l.request_id == line.request_id
        end, 5)
        assert.are.equal("127.0.0.1", ev.client)
        H.net.wait_until(function()
            return stall.stats().open == 1
        end, 10, 0.05, "the sandbox connection closed")
        -- the client gets what the sockets still held, then the end of the connection
        local body, err = resp:read_all(30)
        assert.is_nil(body)
        assert.matches("body bytes still expected", err)
        resp:close()
    end)

    it("cuts off a client that stops reading even while it keeps sending bytes", function()
        -- the bytes the client trickles (the start of a pipelined request) are no progress of
        -- the response: they must not push the send deadline back
        local total = 256 * MIB + 1
        local path = "/alice/stall/bytes/" .. total
        local function cut_offs()
            local n = 0
            for _, l in ipairs(px:log_lines()) do
                if l.msg == "client send timeout" then
                    n = n + 1
                end
            end
            return n
        end
        local before = cut_offs()
        local c = assert(px:connect{ timeout = 10 })
        local resp = assert(c:stream{ path = path })
        assert.are.equal(200, resp.status)
        local t0 = socket.gettime()
        local cut
        for _ = 1, 40 do -- a byte every 0.25 s for up to 10 s, ten times send_timeout
            socket.sleep(0.25)
            if cut_offs() > before or not c:send_raw("G") then
                cut = socket.gettime() - t0
                break
            end
        end
        c:close()
        assert.is_truthy(cut, "the client was not cut off in 10 s")
        H.net.wait_until(function()
            return stall.stats().open == 1
        end, 10, 0.05, "the sandbox connection closed")
    end)
end)

-- upstream_body_buffer_size: once a response body fills the upstream_buffer_size buffer, the
-- sandbox connection reads into a larger one (fewer reads and client writes per MiB). Here
-- the head-sized buffer is 4 KiB and the body buffer 64 KiB, so every body below switches in
-- its first read; with 0 it never does. Either way the bytes and the framing stay exact and a
-- connection that streamed a large body goes back to the pool and serves the next request.
for _, body_buf in ipairs({ 65536, 0 }) do
    describe("large bodies with upstream_body_buffer_size=" .. body_buf, function()
        local up, px

        setup(function()
            up = H.upstream{ name = "body" .. body_buf }
            px = H.start{ sandboxes = { H.sandbox("alice", "sb", up.port) },
                set = { upstream_buffer_size = 4096, upstream_body_buffer_size = body_buf } }
        end)

        teardown(function()
            H.stop_all()
        end)

        it("takes the knob (logged with the settings at start)", function()
            local l = px:wait_log(function(l) return l.msg == "starting" end, 10, "stderr")
            assert.are.equal(body_buf, l.settings.upstream_body_buffer_size)
            assert.are.equal(4096, l.settings.upstream_buffer_size)
        end)

        it("relays Content-Length, chunked and close-delimited bodies intact and reuses the " ..
            "sandbox connection after a large body", function()
            local before = up.stats().connections
            local n = 3 * MIB + 17
            local r = assert(px:request{ path = "/alice/sb/bytes/" .. n, timeout = 20 })
            assert.are.equal(200, r.status)
            assert.are.equal(tostring(n), r.headers["content-length"])
            assert.are.equal(n, #r.body)
            assert(is_pattern_at(r.body, 0))
            r = assert(px:request{ path = "/alice/sb/bytes/" .. n .. "?chunked=1", timeout = 20 })
            assert.are.equal(200, r.status)
            assert.are.equal("chunked", r.headers["transfer-encoding"])
            assert.are.equal(n, #r.body)
            assert(is_pattern_at(r.body, 0))
            r = assert(px:request{ path = "/alice/sb/bytes/10", timeout = 20 })
            assert.are.equal(200, r.status)
            assert.are.equal(pattern(10), r.body)
            -- one sandbox connection served all three (the fixture counts the connections it
            -- accepted, its own /__stats ones included: one per up.stats())
            assert.are.equal(before + 2, up.stats().connections)
            r = assert(px:request{ path = "/alice/sb/noclen?n=" .. n, timeout = 20 })
            assert.are.equal(200, r.status)
            assert.are.equal(n, #r.body)
            assert(is_pattern_at(r.body, 0))
            r = assert(px:request{ method = "HEAD", path = "/alice/sb/bytes/" .. n })
            assert.are.equal(200, r.status)
            assert.are.equal(tostring(n), r.headers["content-length"])
        end)
    end)
end
