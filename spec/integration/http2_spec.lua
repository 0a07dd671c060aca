-- HTTP/2 with prior knowledge (h2c) on the same listener as HTTP/1.1, against the real binary:
-- curl --http2-prior-knowledge and h2load (Debian nghttp2-client) through to HTTP/1.1
-- sandboxes; each stream goes through the same hooks as an HTTP/1.1 request (auth, rate
-- limits, the access log, metrics, the request id); many streams on one connection; flow
-- control (a stream whose reader stalls holds no more than its window and buffer, the proxy's
-- RSS stays flat while its 200 MB response waits, and another stream on the same connection
-- completes); a stream that moves no byte ends after h2_stream_idle_timeout (a stalled upload:
-- 408; a reader that stopped: RST_STREAM CANCEL); max concurrent streams and the header list size as knobs; SIGTERM sends GOAWAY
-- and lets the streams in flight finish.
-- spec/fixtures/h2client.py (standard library only, run by the python3 on PATH) is a frame-level
-- client for what curl and h2load cannot do (a stalled stream window, reading RST_STREAM and
-- GOAWAY); the fixture sandbox (upstream.py) is HTTP/1.1.
local H = require "spec.helpers.proxy"
local process = require "spec.helpers.process"
local crypto = require "sp.crypto"
local cjson = require "cjson"

local H2CLIENT = H.SOURCE_DIR .. "/spec/fixtures/h2client.py"

local function sh(cmd)
    local f = assert(io.popen(cmd .. " 2>&1"))
    local out = f:read("*a")
    local ok, _, code = f:close()
    return out, ok and 0 or code
end

local function q(s)
    return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- curl over h2c; returns status, headers (lower-case names), body, protocol version
local function curl(px, path, args)
    local dir = H.tmpdir()
    local out, code = sh(("curl -sS --http2-prior-knowledge -o %s/body -D %s/head %s %s"):format(
        dir, dir, args or "", q("http://127.0.0.1:" .. px.port .. path)))
    assert(code == 0, "curl failed: " .. out)
    local head = assert(process.read_file(dir .. "/head"))
    local version, status = head:match("^HTTP/(%S+) (%d+)")
    local headers = {}
    for n, v in head:gmatch("\n([^:\r\n]+): ([^\r\n]*)") do
        headers[n:lower()] = v
    end
    return tonumber(status), headers, process.read_file(dir .. "/body") or "", version
end

-- runs h2client.py to completion; returns its JSON lines
local function h2client(px, args)
    local out = sh(("%s %s --port %d %s"):format(H.PYTHON, H2CLIENT, px.port, args))
    local res = {}
    for line in out:gmatch("[^\n]+") do
        local ok, v = pcall(cjson.decode, line)
        assert(ok, "h2client: " .. out)
        res[#res + 1] = v
    end
    return res
end

local function sha_hex(s)
    return crypto.hex(crypto.sha256(s))
end

describe("HTTP/2 (h2c, prior knowledge)", function()
    local up, px

    setup(function()
        assert(H.need_tool("curl", "HTTP/2 requests"))
        up = H.upstream{ name = "h2" }
        px = H.start{ sandboxes = { H.sandbox("a", "b", up.port) } }
    end)

    teardown(function()
        H.stop_all()
    end)

    it("proxies a GET to an HTTP/1.1 sandbox with the same request id both ways", function()
        local status, headers, body, version = curl(px, "/a/b/echo?x=1")
        assert.are.equal("2", version)
        assert.are.equal(200, status)
        local e = cjson.decode(body)
        assert.are.equal("HTTP/1.1", e.http_version)
        assert.are.equal("/echo?x=1", e.target)
        local seen = {}
        for _, h in ipairs(e.headers) do
            seen[h[1]:lower()] = h[2]
        end
        assert.are.equal("127.0.0.1:" .. px.port, seen.host) -- from :authority
        assert.are.equal(headers["x-request-id"], seen["x-request-id"])
        assert.is_nil(headers["connection"])
        assert.is_nil(headers["transfer-encoding"])
    end)

    it("streams uploads and chunked downloads byte for byte", function()
        local dir = H.tmpdir()
        local data = {}
        for i = 1, 3000 do
            data[i] = ("%07d-"):format(i):rep(128)
        end
        data = table.concat(data) -- 3 MB
        assert(process.write_file(dir .. "/up.bin", data))
        local status, _, body = curl(px, "/a/b/sink", "--data-binary @" .. dir .. "/up.bin")
        assert.are.equal(200, status)
        local r = cjson.decode(body)
        assert.are.equal(#data, r.bytes)
        assert.are.equal(sha_hex(data), r.sha256)
        -- a chunked response arrives de-chunked, whole
        local s2, _, b2 = curl(px, "/a/b/bytes/2000000?chunked=1")
        assert.are.equal(200, s2)
        assert.are.equal(2000000, #b2)
        local _, _, shabody = curl(px, "/a/b/pattern-sha/2000000")
        assert.are.equal(cjson.decode(shabody).sha256, sha_hex(b2))
    end)

    it("joins cookies sent as separate fields into one Cookie header for the sandbox", function()
        local res = h2client(px, "streams --req /a/b/echo --header cookie=a=1 --header x-m=2 "
            .. "--header cookie=b=2")
        local e = cjson.decode(res[1].body)
        local cookies = {}
        for _, h in ipairs(e.headers) do
            if h[1]:lower() == "cookie" then
                cookies[#cookies + 1] = h[2]
            end
        end
        assert.are.same({ "a=1; b=2" }, cookies)
    end)

    it("answers the proxy's own responses (404, /health) over HTTP/2", function()
        local status, headers, body = curl(px, "/nobody/none/x")
        assert.are.equal(404, status)
        assert.are.equal("sandbox not found", cjson.decode(body).error)
        assert.truthy(headers["x-request-id"])
        assert.are.equal(200, (curl(px, "/health")))
    end)

    it("logs each stream in the access log and counts it in the metrics", function()
        local _, headers = curl(px, "/a/b/echo?logme=1")
        local id = headers["x-request-id"]
        local line = px:wait_log(function(l)
            return l.request_id == id
        end, 10, "stdout")
        assert.are.equal("/a/b/echo", line.path)
        assert.are.equal(200, line.status)
        assert.are.equal("GET", line.method)
        local _, _, metrics = curl(px, "/metrics")
        assert.matches('sandbox_proxy_requests_total{method="GET",code="2xx"} %d+', metrics)
    end)

    it("carries many concurrent streams on one connection (h2load)", function()
        local ok, why = H.need_tool("h2load", "HTTP/2 load on one connection")
        if not ok then
            pending(why)
            return
        end
        local before = up.stats().requests
        local out = sh(("h2load -n 200 -c 1 -m 20 %s"):format(
            q("http://127.0.0.1:" .. px.port .. "/a/b/echo")))
        assert.matches("requests: 200 total, 200 started, 200 done, 200 succeeded, 0 failed", out)
        assert.matches("status codes: 200 2xx", out)
        assert.are.equal(before + 201, up.stats().requests) -- and the second /__stats
        -- several streams at once, each answered on its own stream
        local res = h2client(px, "streams --req /a/b/delay?ms=200 --req /a/b/echo --req /x/y/z")
        assert.is_true(res[1]["end"])
        assert.matches('"slept_ms":200', res[1].body)
        assert.matches('"target":"/echo"', res[2].body)
        assert.matches("sandbox not found", res[3].body)
    end)

    it("keeps a stalled stream's response out of memory while another stream completes", function()
        local dir = H.tmpdir()
        local rss0 = px:rss_kib()
        -- stream 1: 200 MB whose window the client never opens; stream 3: 3 MB read at once
        local p = assert(process.spawn{ cmd = { H.PYTHON, H2CLIENT, "--port", px.port,
            "--timeout", "30", "streams", "--req", "/a/b/bytes/200000000", "--req",
            "/a/b/bytes/3000000", "--stall", "0", "--hold-file", dir .. "/go" },
            stdout = dir .. "/out", stderr = dir .. "/err" })
        assert(p:wait_output('"ready"', 30))
        -- the stalled stream's sandbox is not read beyond the stream's buffer: RSS stays flat
        local rss1 = px:rss_kib()
        assert(process.write_file(dir .. "/go", ""))
        assert(p:wait(20))
        local lines = {}
        for l in assert(process.read_file(dir .. "/out")):gmatch("[^\n]+") do
            lines[#lines + 1] = cjson.decode(l)
        end
        assert.are.equal(3000000, lines[3].data)
        assert.is_true(lines[3]["end"])
        assert.are.equal(65535, lines[2].data) -- exactly the stream's initial window
        assert.is_false(lines[2]["end"])
        assert.is_true(rss1 - rss0 < 32 * 1024,
            ("proxy RSS grew %d KiB while a 200 MB response waited"):format(rss1 - rss0))
    end)

    it("ends a stream that moves no byte for h2_stream_idle_timeout", function()
        local px2 = H.start{ sandboxes = { H.sandbox("a", "b", up.port) },
            set = { h2_stream_idle_timeout = 0.5 } }
        -- a request body that never ends: answered 408 (the sandbox's exchange dropped)
        local res = h2client(px2, "--timeout 8 streams --req /a/b/echo --data 6869 --open-body")
        assert.is_true(res[1]["end"], cjson.encode(res))
        assert.matches("request body timeout", res[1].body, 1, true)
        -- a response the client stops reading (its window shut): reset with CANCEL (8)
        res = h2client(px2, "--timeout 3 streams --req /a/b/bytes/3000000 --stall 0 --until-close")
        assert.are.equal(8, res[1].rst, cjson.encode(res))
        assert.is_true(res[1].data <= 65535)
        local n = 0
        for _ in px2:stderr():gmatch("http2 stream idle timeout") do
            n = n + 1
        end
        assert.are.equal(2, n)
        -- streams that move bytes are not idle: a 3 MB download read at once completes
        res = h2client(px2, "--timeout 8 streams --req /a/b/bytes/3000000")
        assert.is_true(res[1]["end"])
        assert.are.equal(3000000, res[1].data)
    end)

    it("uses the HTTP/1.1 path when http2 is off", function()
        local px2 = H.start{ sandboxes = { H.sandbox("a", "b", up.port) }, set = { http2 = false } }
        local r = px2:raw("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        assert.are.equal(400, r and r.status)
    end)
end)

describe("HTTP/2 hooks and limits", function()
    local up

    setup(function()
        up = H.upstream{ name = "h2lim" }
    end)

    teardown(function()
        H.stop_all()
    end)

    it("applies auth and rate limits to streams as to HTTP/1.1 requests", function()
        local dir = H.tmpdir()
        assert(process.write_file(dir .. "/keys.json", cjson.encode({ keys = {
            { user = "a", sha256 = sha_hex("a-key-1") } } })))
        local px = H.start{ sandboxes = { H.sandbox("a", "b", up.port) },
            config = ([[return { auth = { keys_file = %q },
                ratelimit = { limits = { { name = "user", key = "identity", rate = 0.1, burst = 2 } } } }]])
                :format(dir .. "/keys.json") }
        local s = curl(px, "/a/b/echo")
        assert.are.equal(401, s)
        local auth = "-H 'Authorization: Bearer a-key-1'"
        assert.are.equal(200, (curl(px, "/a/b/echo", auth)))
        assert.are.equal(200, (curl(px, "/a/b/echo", auth)))
        local s3, h3 = curl(px, "/a/b/echo", auth)
        assert.are.equal(429, s3)
        assert.truthy(h3["retry-after"])
    end)

    it("refuses streams beyond h2_max_concurrent_streams with REFUSED_STREAM", function()
        local px = H.start{ sandboxes = { H.sandbox("a", "b", up.port) },
            set = { h2_max_concurrent_streams = 2 } }
        local res = h2client(px, "streams --req /a/b/delay?ms=500 --req /a/b/delay?ms=500 "
            .. "--req /a/b/delay?ms=500 --req /a/b/delay?ms=500")
        local done, refused = 0, 0
        for i = 1, 4 do
            if res[i]["end"] then
                done = done + 1
            elseif res[i].rst == 7 then
                refused = refused + 1
            end
        end
        assert.are.equal(2, done)
        assert.are.equal(2, refused)
    end)

    it("answers 431 to a header list over max_header_size", function()
        local px = H.start{ sandboxes = { H.sandbox("a", "b", up.port) },
            set = { max_header_size = 4096 } }
        local big = "-H " .. q("X-Big: " .. ("v"):rep(6000))
        local s, _, body = curl(px, "/a/b/echo", big)
        assert.are.equal(431, s)
        assert.matches("too large", body)
        assert.are.equal(200, (curl(px, "/a/b/echo", "-H 'X-Small: 1'")))
    end)

    it("sends GOAWAY on SIGTERM and finishes the streams in flight, then exits 0", function()
        local up2 = H.upstream{ name = "h2drain" } -- its only connections are this test's
        local px = H.start{ sandboxes = { H.sandbox("a", "b", up2.port) }, set = { drain_timeout = 10 } }
        local dir = H.tmpdir()
        local p = assert(process.spawn{ cmd = { H.PYTHON, H2CLIENT, "--port", px.port,
            "--timeout", "20", "streams", "--until-close", "--req", "/a/b/delay?ms=1000",
            "--req", "/a/b/delay?ms=1200" }, stdout = dir .. "/out", stderr = dir .. "/err" })
        -- both requests are at the sandbox: two connections open besides the one asking
        H.net.wait_until(function() return up2.stats().open >= 3 end, 10)
        assert(px.proc:signal("TERM"))
        assert(p:wait(20))
        local lines = {}
        for l in assert(process.read_file(dir .. "/out")):gmatch("[^\n]+") do
            lines[#lines + 1] = cjson.decode(l)
        end
        assert.is_true(lines[1]["end"])
        assert.matches('"slept_ms":1000', lines[1].body)
        assert.is_true(lines[2]["end"])
        assert.matches('"slept_ms":1200', lines[2].body)
        assert.are.equal(0, lines[3].code) -- GOAWAY NO_ERROR
        assert.is_true(lines[3].goaway >= 3)
        assert.is_true(lines[3].closed)
        local code, how = px.proc:wait(10)
        assert.are.equal("exited", how)
        assert.are.equal(0, code)
    end)
end)
