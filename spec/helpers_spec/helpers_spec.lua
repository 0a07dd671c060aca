-- Specs for the reusable test helpers in spec/helpers/.
-- Run from the repository root:  luajit /usr/bin/busted spec/helpers_spec

local process = require "spec.helpers.process"
local net = require "spec.helpers.net"
local http = require "spec.helpers.http"
local ws = require "spec.helpers.ws"
local sha1 = require "spec.helpers.sha1"
local b64 = require "spec.helpers.b64"
local cjson = require "cjson"
local socket = require "socket"
local psignal = require "posix.signal"

local now = socket.gettime

-- Directory of this spec file, so the fixture is found from any cwd.
local HERE = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "spec/helpers_spec"
local FIXTURE = HERE .. "/fixture_server.py"

local function start_fixture(dir)
    local port = assert(net.free_port())
    local p = assert(process.spawn{
        cmd = { "python3", "-u", FIXTURE, tostring(port) },
        stdout = dir .. "/fixture.out",
        stderr = dir .. "/fixture.err",
    })
    local ok, err = net.wait_port("127.0.0.1", port, 30, p)
    assert(ok, tostring(err) .. "\n" .. tostring(p:read_stderr()))
    return p, port
end

describe("sha1 / b64", function()
    it("matches known vectors", function()
        assert.equal("a9993e364706816aba3e25717850c26c9cd0d89d", sha1.hex("abc"))
        assert.equal("da39a3ee5e6b4b0d3255bfef95601890afd80709", sha1.hex(""))
        assert.equal("84983e441c3bd26ebaae4aa1f95129e5e54670f1",
                     sha1.hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"))
        assert.equal(20, #sha1.binary("x"))
        assert.equal("Zm9vYmFy", b64.encode("foobar"))
        assert.equal("Zm9vYg==", b64.encode("foob"))
        assert.equal("foob", b64.decode("Zm9vYg=="))
        local bin = ws.random_bytes(1000)
        assert.equal(bin, b64.decode(b64.encode(bin)))
        -- RFC 6455 section 1.3 example
        assert.equal("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", ws.accept_key("dGhlIHNhbXBsZSBub25jZQ=="))
    end)
end)

describe("process", function()
    local dir

    setup(function()
        dir = assert(process.tmpdir())
    end)

    teardown(function()
        process.stop_all()
        process.rm_rf(dir)
    end)

    it("spawns, captures stdout/stderr and returns the exit code", function()
        local p = assert(process.spawn{
            cmd = { "sh", "-c", "echo hello; echo oops >&2; exit 3" },
            stdout = dir .. "/o1", stderr = dir .. "/e1",
        })
        assert.is_number(p:pid())
        local code, how, value = p:wait(5)
        assert.equal(3, code)
        assert.equal("exited", how)
        assert.equal(3, value)
        assert.is_false(p:alive())
        assert.equal("hello\n", p:read_stdout())
        assert.equal("oops\n", p:read_stderr())
    end)

    it("passes env additions and removals, and cwd", function()
        local p = assert(process.spawn{
            cmd = { "sh", "-c", 'echo "FOO=$FOO HOME=${HOME-unset}"; pwd' },
            env = { FOO = "bar baz", HOME = false },
            cwd = dir,
            stdout = dir .. "/o2",
            stderr = dir .. "/o2",
        })
        assert.equal(0, p:wait(5))
        local out = p:read_stdout()
        assert.matches("FOO=bar baz HOME=unset\n", out, 1, true)
        -- pwd may print a symlink-resolved path; compare the last component
        assert.matches(dir:match("[^/]+$"), out, 1, true)
    end)

    it("accepts a shell string as cmd", function()
        local p = assert(process.spawn{ cmd = "echo $((1+2))", stdout = dir .. "/o3" })
        assert.equal(0, p:wait(5))
        assert.equal("3\n", p:read_stdout())
    end)

    it("reports exec failures", function()
        local p, err = process.spawn{ cmd = { "/nonexistent/definitely-not-here" } }
        assert.is_nil(p)
        assert.matches("exec failed", err)
    end)

    it("does not leak the parent's descriptors into the child", function()
        local server = assert(socket.bind("127.0.0.1", 0))
        local f = assert(io.open(dir .. "/held-open", "w"))
        local p = assert(process.spawn{ cmd = { "sh", "-c", "ls /proc/$$/fd" }, stdout = dir .. "/fds" })
        assert.equal(0, p:wait(5))
        server:close()
        f:close()
        for fd in p:read_stdout():gmatch("%d+") do
            assert.is_true(tonumber(fd) <= 2, "leaked fd " .. fd)
        end
    end)

    it("signals by name and reports how the process ended", function()
        local p = assert(process.spawn{ cmd = { "sleep", "30" } })
        assert.is_true(p:alive())
        assert.same({ nil, "timeout" }, { p:wait(0.05) })
        assert.is_true(p:signal("TERM"))
        local code, how, sig = p:wait(5)
        assert.equal("killed", how)
        assert.equal(psignal.SIGTERM, sig)
        assert.equal(128 + psignal.SIGTERM, code)
    end)

    it("stop() escalates to KILL for a process ignoring TERM, killing its group", function()
        local pidfile = dir .. "/child.pid"
        local p = assert(process.spawn{
            cmd = { "sh", "-c", 'trap "" TERM; sleep 30 & echo $! > ' .. pidfile .. '; wait; wait' },
        })
        local child = tonumber(net.wait_until(function()
            local s = process.read_file(pidfile)
            return s and s:match("%d+")
        end, 5))
        local t0 = now()
        local code, how, sig, forced = p:stop(0.3)
        local elapsed = now() - t0
        assert.equal("killed", how)
        assert.equal(psignal.SIGKILL, sig)
        assert.equal(137, code)
        assert.is_true(forced)
        assert.is_true(elapsed >= 0.25 and elapsed < 3, "elapsed " .. elapsed)
        -- the grandchild (background sleep) is gone too (or a zombie)
        net.wait_until(function()
            local stat = process.read_file("/proc/" .. child .. "/stat")
            return stat == nil or stat:match("^%d+ %b() Z")
        end, 3)
    end)

    it("stop() of a cooperative process returns its TERM status quickly", function()
        local p = assert(process.spawn{ cmd = { "sleep", "30" } })
        local t0 = now()
        local code, how, sig, forced = p:stop(5)
        assert.equal("killed", how)
        assert.equal(psignal.SIGTERM, sig)
        assert.equal(143, code)
        assert.is_false(forced)
        assert.is_true(now() - t0 < 2)
        -- stopping again just returns the cached status
        assert.equal(143, (p:stop()))
    end)

    it("stop_all() stops everything still running", function()
        local a = assert(process.spawn{ cmd = { "sleep", "30" } })
        local b = assert(process.spawn{ cmd = { "sh", "-c", 'trap "" TERM; sleep 30' } })
        assert.is_true(#process.running() >= 2)
        process.stop_all(0.3)
        assert.is_false(a:alive())
        assert.is_false(b:alive())
        assert.equal(0, #process.running())
    end)

    it("wait_output() waits for a pattern in captured output", function()
        local p = assert(process.spawn{
            cmd = { "sh", "-c", "sleep 0.2; echo ready on 1234; sleep 30" },
            stdout = dir .. "/wo",
        })
        assert.equal("ready on 1234", p:wait_output("ready on %d+", 5))
        local none, err = p:wait_output("never", 0.1)
        assert.is_nil(none)
        assert.matches("timeout", err)
        p:stop()
    end)

    it("handles files and temp dirs", function()
        local d = assert(process.tmpdir("helpers-x"))
        assert.is_true(process.write_file(d .. "/a.bin", "a\0b"))
        assert.equal("a\0b", process.read_file(d .. "/a.bin"))
        os.execute("mkdir -p " .. d .. "/sub/deeper && touch " .. d .. "/sub/deeper/f && ln -s / " .. d .. "/sub/root")
        assert.is_true(process.rm_rf(d))
        assert.is_nil(process.read_file(d .. "/a.bin"))
        assert.is_nil((process.rm_rf("/")))
        assert.is_nil((process.rm_rf("relative/path")))
        local t0 = now()
        process.sleep(0.05)
        assert.is_true(now() - t0 >= 0.04)
    end)
end)

describe("net", function()
    teardown(function()
        process.stop_all()
    end)

    it("free_port returns distinct bindable ports", function()
        local a, b = assert(net.free_port()), assert(net.free_port())
        assert.are_not.equal(a, b)
        local s = assert(socket.bind("127.0.0.1", a))
        s:close()
    end)

    it("wait_port succeeds once something listens and times out otherwise", function()
        local port = assert(net.free_port())
        local t0 = now()
        local ok, err = net.wait_port("127.0.0.1", port, 0.2)
        assert.is_nil(ok)
        assert.matches("timeout", err)
        assert.is_true(now() - t0 < 1.5)

        local p = assert(process.spawn{
            cmd = { "python3", "-c", ([[
import socket, time
time.sleep(0.3)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", %d)); s.listen(5); time.sleep(30)
]]):format(port) },
        })
        assert.is_true(net.wait_port("127.0.0.1", port, 30, p))
        p:stop()
    end)

    it("wait_port fails fast when the process exits", function()
        local p = assert(process.spawn{ cmd = { "sh", "-c", "exit 7" } })
        local t0 = now()
        local ok, err = net.wait_port("127.0.0.1", assert(net.free_port()), 10, p)
        assert.is_nil(ok)
        assert.matches("exited", err)
        assert.is_true(now() - t0 < 2)
    end)

    it("wait_until returns fn's values, tolerates errors, and explains timeouts", function()
        local n = 0
        local a, b = net.wait_until(function()
            n = n + 1
            if n < 3 then error("not yet") end
            return n, "done"
        end, 2)
        assert.equal(3, a)
        assert.equal("done", b)
        local ok, err = pcall(net.wait_until, function() return nil, "still starting" end, 0.1)
        assert.is_false(ok)
        assert.matches("still starting", err)
        ok, err = pcall(net.wait_until, function() error("kaboom") end, 0.1)
        assert.is_false(ok)
        assert.matches("kaboom", err)
    end)
end)

describe("http against python -m http.server", function()
    local dir, port, srv

    setup(function()
        dir = assert(process.tmpdir())
        assert(process.write_file(dir .. "/hello.txt", "hello world\n"))
        port = assert(net.free_port())
        srv = assert(process.spawn{
            cmd = { "python3", "-m", "http.server", tostring(port), "--bind", "127.0.0.1", "--directory", dir },
            stdout = dir .. "/srv.out", stderr = dir .. "/srv.err",
        })
        assert(net.wait_port("127.0.0.1", port, 10, srv))
    end)

    teardown(function()
        process.stop_all()
        process.rm_rf(dir)
    end)

    it("GETs a file", function()
        local r = assert(http.request{ port = port, path = "/hello.txt" })
        assert.equal(200, r.status)
        assert.equal("hello world\n", r.body)
        assert.equal(12, r.body_length)
        assert.equal("12", r.headers["content-length"])
        assert.equal("length", r.framing)
        assert.is_table(r.header_list)
        -- http.server answers HTTP/1.0 and closes the connection
        assert.equal("1.0", r.version)
        assert.is_true(r.closed)
    end)

    it("reports 404 and handles HEAD without a body", function()
        local r = assert(http.request{ port = port, path = "/missing" })
        assert.equal(404, r.status)
        local h = assert(http.request{ port = port, method = "HEAD", path = "/hello.txt" })
        assert.equal(200, h.status)
        assert.equal("", h.body)
        assert.equal("12", h.headers["content-length"])
        assert.is_nil(h.extra)
    end)

    it("returns an error for a refused connection", function()
        local r, err = http.request{ port = assert(net.free_port()), path = "/" }
        assert.is_nil(r)
        assert.matches("connect 127.0.0.1:%d+: connection refused", err)
    end)
end)

describe("http against the fixture server", function()
    local dir, port

    setup(function()
        dir = assert(process.tmpdir())
        local _
        _, port = start_fixture(dir)
    end)

    teardown(function()
        process.stop_all()
        process.rm_rf(dir)
    end)

    local function echo(r)
        assert.equal(200, r.status, r.body)
        return cjson.decode(r.body)
    end

    it("sends Host and the request-target verbatim", function()
        local r = assert(http.request{ port = port, path = "/echo?a=1&b=%2F", headers = { ["X-Test"] = "yes" } })
        local info = echo(r)
        assert.equal("/echo?a=1&b=%2F", info.path)
        local hdrs = {}
        for _, h in ipairs(info.headers) do hdrs[h[1]:lower()] = h[2] end
        assert.equal("127.0.0.1:" .. port, hdrs.host)
        assert.equal("yes", hdrs["x-test"])
        assert.is_false(r.closed)
    end)

    it("adds Content-Length for string bodies and empty POSTs", function()
        local info = echo(assert(http.request{ port = port, method = "POST", path = "/echo", body = "abc" }))
        assert.equal("abc", info.body)
        local hdrs = {}
        for _, h in ipairs(info.headers) do hdrs[h[1]:lower()] = h[2] end
        assert.equal("3", hdrs["content-length"])
        info = echo(assert(http.request{ port = port, method = "PUT", path = "/echo" }))
        hdrs = {}
        for _, h in ipairs(info.headers) do hdrs[h[1]:lower()] = h[2] end
        assert.equal("0", hdrs["content-length"])
    end)

    it("reuses a keep-alive connection", function()
        local c = assert(http.connect("127.0.0.1", port, { timeout = 5 }))
        local i1 = echo(assert(c:request{ path = "/echo" }))
        local i2 = echo(assert(c:request{ path = "/echo", method = "POST", body = "x" }))
        assert.equal(i1.conn_id, i2.conn_id)
        assert.equal(1, i1.req_index)
        assert.equal(2, i2.req_index)
        assert.equal(c:local_port(), i1.client_port)
        assert.is_false(c:closed_by_peer(0.1))
        c:close()
    end)

    it("uploads with chunked encoding from body_source (with trailers)", function()
        local pieces, i = { ("a"):rep(10), ("b"):rep(20), "", ("c"):rep(30) }, 0
        local r = assert(http.request{
            port = port, method = "POST", path = "/echo",
            body_source = function() i = i + 1; return pieces[i] end,
            trailers = { { "X-Sum", "60" } },
        })
        local info = echo(r)
        assert.same({ 10, 20, 30 }, info.chunk_sizes)
        assert.equal(table.concat(pieces), info.body)
        assert.same({ "X-Sum: 60" }, info.trailers)
        local te
        for _, h in ipairs(info.headers) do if h[1]:lower() == "transfer-encoding" then te = h[2] end end
        assert.equal("chunked", te)
    end)

    it("sends body_source raw when Content-Length is given", function()
        local pieces, i = { "hello ", "world" }, 0
        local r = assert(http.request{
            port = port, method = "POST", path = "/echo",
            headers = { { "Content-Length", "11" } },
            body_source = function() i = i + 1; return pieces[i] end,
        })
        local info = echo(r)
        assert.equal("hello world", info.body)
        assert.equal(cjson.null, info.chunk_sizes)
    end)

    it("decodes chunked responses with trailers", function()
        local r = assert(http.request{ port = port, path = "/chunked?n=3&size=5&trailer=1" })
        assert.equal("chunked", r.framing)
        assert.equal("0:xxxxx1:xxxxx2:xxxxx", r.body)
        assert.same({ 7, 7, 7 }, r.chunk_sizes)
        assert.equal(sha1.hex(r.body), r.trailers["x-checksum"])
        assert.is_false(r.closed)
        local big = assert(http.request{ port = port, path = "/chunked?n=50&size=4000" })
        assert.equal(50, #big.chunk_sizes)
        assert.equal(50 * 4000 + 140, #big.body)
    end)

    it("handles pipelined requests in order", function()
        local c = assert(http.connect("127.0.0.1", port))
        local host = "Host: 127.0.0.1:" .. port .. "\r\n"
        assert(c:send_raw(
            "GET /echo?n=1 HTTP/1.1\r\n" .. host .. "\r\n" ..
            "HEAD /echo?n=2 HTTP/1.1\r\n" .. host .. "\r\n" ..
            "GET /chunked?n=2&size=3 HTTP/1.1\r\n" .. host .. "\r\n" ..
            "POST /echo?n=4 HTTP/1.1\r\n" .. host .. "Content-Length: 4\r\n\r\nbody"))
        local r1 = assert(c:read_response{ method = "GET" })
        local r2 = assert(c:read_response{ method = "HEAD" })
        local r3 = assert(c:read_response{ method = "GET" })
        local r4 = assert(c:read_response{ method = "POST" })
        assert.equal("/echo?n=1", echo(r1).path)
        assert.equal(200, r2.status)
        assert.equal("", r2.body)
        assert.is_truthy(tonumber(r2.headers["content-length"]) > 0)
        assert.equal("0:xxx1:xxx", r3.body)
        local i4 = echo(r4)
        assert.equal("body", i4.body)
        assert.equal(4, i4.req_index)
        c:close()
    end)

    it("records 100 Continue and handles a rejected Expect", function()
        local r = assert(http.request{
            port = port, method = "POST", path = "/echo", body = "payload",
            headers = { { "Expect", "100-continue" } },
        })
        assert.equal(1, #r.interim)
        assert.equal(100, r.interim[1].status)
        assert.equal("payload", echo(r).body)

        local rj = assert(http.request{
            port = port, method = "POST", path = "/expect-reject", body = "payload",
            headers = { { "Expect", "100-continue" } },
        })
        assert.equal(417, rj.status)
        assert.equal("rejected", rj.body)
        assert.is_false(rj.body_sent)
        assert.is_true(rj.closed)
    end)

    it("reads EOF-delimited bodies and notices Connection: close", function()
        local r = assert(http.request{ port = port, path = "/eof" })
        assert.equal("eof", r.framing)
        assert.equal(("body until eof\n"):rep(3), r.body)
        assert.is_true(r.closed)

        local c = assert(http.connect("127.0.0.1", port))
        local rc = assert(c:request{ path = "/close" })
        assert.equal("bye\n", rc.body)
        assert.is_false(rc.keep_alive)
        assert.is_true(rc.closed)
        assert.is_true(c:closed_by_peer(1))
        local again, err = c:request{ path = "/echo" }
        assert.is_nil(again)
        assert.matches("closed", err)
        c:close()
    end)

    it("knows that 204 and 304 have no body", function()
        local c = assert(http.connect("127.0.0.1", port))
        local r1 = assert(c:request{ path = "/status/204" })
        local r2 = assert(c:request{ path = "/status/304" })
        local r3 = assert(c:request{ path = "/status/201" })
        assert.equal(204, r1.status)
        assert.equal("", r1.body)
        assert.equal(304, r2.status)
        assert.equal("", r2.body)
        assert.equal("status 201\n", r3.body)
        c:close()
    end)

    it("rejects malformed responses", function()
        local cases = {
            ["/bad/bare-lf"] = "CRLF",
            ["/bad/cl-te"] = "both Transfer%-Encoding and Content%-Length",
            ["/bad/chunk-crlf"] = "not followed by CRLF",
            ["/bad/truncated"] = "body bytes still expected",
        }
        for path, pattern in pairs(cases) do
            local r, err = http.request{ port = port, path = path }
            assert.is_nil(r, path)
            assert.matches("protocol error", err)
            assert.matches(pattern, err)
        end
    end)

    it("times out instead of hanging", function()
        local t0 = now()
        local r, err = http.request{ port = port, path = "/hang?s=2", timeout = 0.3 }
        assert.is_nil(r)
        assert.equal("timeout", err)
        assert.is_true(now() - t0 < 1)
    end)

    it("streams body pieces as they arrive", function()
        local resp = assert(http.stream{ port = port, path = "/slow?n=4&interval=0.25&size=10" })
        assert.equal(200, resp.status)
        assert.equal("40", resp.headers["content-length"])
        local pieces, times = {}, {}
        while true do
            local piece, err = resp:next_chunk(3)
            assert.is_nil(err)
            if not piece then break end
            pieces[#pieces + 1] = piece
            times[#times + 1] = now()
        end
        resp:close()
        assert.equal(string.rep("a", 10) .. string.rep("b", 10) .. string.rep("c", 10) .. string.rep("d", 10),
                     table.concat(pieces))
        assert.equal(4, #pieces)
        for i = 2, #times do
            assert.is_true(times[i] - times[i - 1] > 0.15, "pieces arrived too close together")
        end
    end)

    it("next_chunk times out cleanly and can resume", function()
        local resp = assert(http.stream{ port = port, path = "/chunked?n=1&size=3" })
        assert.equal("0:xxx", resp:next_chunk(2))
        assert.is_nil(resp:next_chunk(2))
        resp:close()

        resp = assert(http.stream{ port = port, path = "/slow?n=2&interval=0.6&size=5" })
        assert.equal("aaaaa", resp:next_chunk(2))
        local none, err = resp:next_chunk(0.1)
        assert.is_nil(none)
        assert.equal("timeout", err)
        assert.equal("bbbbb", resp:next_chunk(3))
        assert.is_nil(resp:next_chunk(1))
        resp:close()
    end)

    it("streams on a persistent connection and reuses it afterwards", function()
        local c = assert(http.connect("127.0.0.1", port))
        local resp = assert(c:stream{ path = "/chunked?n=3&size=2" })
        local busy, berr = c:request{ path = "/echo" }
        assert.is_nil(busy)
        assert.matches("not fully read", berr)
        assert.equal("0:xx1:xx2:xx", resp:read_all(3))
        local head = assert(c:stream{ path = "/echo", method = "HEAD" })
        assert.is_nil(head:next_chunk(1))
        local info = echo(assert(c:request{ path = "/echo" }))
        assert.equal(3, info.req_index)
        c:close()
    end)

    it("parses server-sent events one by one", function()
        local resp = assert(http.stream{ port = port, path = "/sse?n=4&interval=0.2" })
        assert.equal("text/event-stream", resp.headers["content-type"])
        local first = http.sse_events(resp, 1, 3)
        assert.equal(1, #first)
        local rest, err = http.sse_events(resp, 3, 3)
        assert.is_nil(err)
        local events = { first[1], rest[1], rest[2], rest[3] }
        for i, ev in ipairs(events) do
            assert.equal(tostring(i), ev.id)
            assert.equal("tick", ev.event)
            if i == 2 then
                assert.equal("event 2\nsecond line", ev.data)
            else
                assert.equal("event " .. i, ev.data)
            end
            if i > 1 then
                local gap = ev.t - events[i - 1].t
                assert.is_true(gap > 0.12, "events " .. (i - 1) .. " and " .. i .. " arrived " .. gap .. "s apart")
            end
        end
        assert.same({ " hello" }, resp.sse_comments)
        local more, err2 = http.sse_events(resp, 1, 2)
        assert.same({}, more)
        assert.equal("eof", err2)
        resp:close()
    end)
end)

describe("ws against the fixture server", function()
    local dir, port

    setup(function()
        dir = assert(process.tmpdir())
        local _
        _, port = start_fixture(dir)
    end)

    teardown(function()
        process.stop_all()
        process.rm_rf(dir)
    end)

    it("echoes text, 70 KB binary, and answers pings", function()
        local c, resp = ws.connect{ port = port, path = "/ws" }
        assert.is_table(c, resp)
        assert.equal(101, resp.status)
        assert.is_true(c:send_text("hello"))
        assert.same({ "text", "hello" }, { c:receive(2) })
        local big = ws.random_bytes(70 * 1024)
        assert.is_true(c:send_binary(big))
        local kind, payload = c:receive(5)
        assert.equal("binary", kind)
        assert.equal(#big, #payload)
        assert.is_true(big == payload)
        local mid = ws.random_bytes(300) -- 16-bit length
        c:send_binary(mid)
        assert.equal(mid, select(2, c:receive(2)))
        assert.is_true(c:ping("are you there"))
        assert.same({ "pong", "are you there" }, { c:receive(2) })
        local none, err = c:receive(0.1)
        assert.is_nil(none)
        assert.equal("timeout", err)
        assert.same({ true, 1000, "" }, { c:close(1000) })
    end)

    it("auto-answers server pings and reassembles fragmented messages", function()
        local c = assert(ws.connect{ port = port, path = "/ws?fragment=1000" })
        c:send_text("please-ping")
        assert.same({ "ping", "hello-ping" }, { c:receive(2) })
        assert.same({ "text", "pong:hello-ping" }, { c:receive(2) })

        local msg = ws.random_bytes(5000)
        c:send_binary(msg)
        -- the server interleaves a ping after the first fragment
        assert.same({ "ping", "mid" }, { c:receive(2) })
        local kind, payload = c:receive(2)
        assert.equal("binary", kind)
        assert.is_true(payload == msg)
        assert.equal(5, c.last_fragments)
        assert.same({ "text", "pong:mid" }, { c:receive(2) })

        -- client-side fragmentation
        assert(c:send_frame("text", "hel", false))
        assert(c:send_frame("continuation", "lo", true))
        assert.same({ "text", "hello" }, { c:receive(2) })
        assert.is_true((c:close()))
    end)

    it("returns the HTTP response when the upgrade is refused", function()
        local c, err, resp = ws.connect{ port = port, path = "/echo" }
        assert.is_nil(c)
        assert.matches("expected status 101, got 200", err)
        assert.equal(200, resp.status)
    end)
end)
