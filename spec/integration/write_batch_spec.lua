-- io_uring_writes (runtime/http/wbatch.c): the small writes of one loop iteration go out in one
-- io_uring_enter. Against the real binary and real sockets:
-- - writes staged in the same iteration are sent as one batch (counted in /metrics), and not at
--   all with io_uring_writes=false, or where a seccomp filter refuses io_uring (logged once),
--   where the same traffic still gets the same answers;
-- - a client that does not read: staged responses the socket cannot take go on through libuv,
--   every byte in order (600 pipelined 16,000-byte responses, read once 10 are answered), and a
--   client that never reads them is closed after send_timeout;
-- - client bytes that arrive while a staged write to that client is pending (a WebSocket
--   tunnel) go on once it has gone, without waiting for more;
-- - a pooled sandbox connection that receives bytes while the request that takes it is being
--   decided is not used: the batched quiet check before the send finds them, the request goes
--   to a fresh connection, and the stray bytes never reach the client.
local H = require "spec.helpers.proxy"
local prom = require "spec.helpers.prometheus"
local process = require "spec.helpers.process"
local ws = require "spec.helpers.ws"

local function scrape(px)
    local r = assert(px:get("/metrics"))
    assert.are.equal(200, r.status, r.body)
    return prom.assert_parse(r.body)
end

-- A sandbox of our own: python3 listens on a free port (the socket `s`, its "up" printed once
-- it does), then runs `source` (formatted with ...). Returns the port and the process.
local function python_sandbox(dir, source, ...)
    local port = assert(H.net.free_port())
    local p = assert(process.spawn{ cmd = { H.PYTHON, "-c", ("import socket\n"
        .. "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        .. "s.bind(('127.0.0.1', %d)); s.listen(16); print('up', flush=True)\n"):format(port)
        .. source:format(...) }, stdout = dir .. "/sandbox" })
    assert(p:wait_output("up", 20))
    return port, p
end

-- The fixture's byte pattern (byte i = i % 251).
local function pattern(n)
    local t = {}
    for i = 0, 250 do
        t[#t + 1] = string.char(i)
    end
    return (table.concat(t):rep(math.ceil(n / 251))):sub(1, n)
end

-- Sends one request on each of n connections while the proxy spins on a first one, then reads
-- every answer: the n requests wait for the same poll, so their sandbox writes share a batch.
local function burst(px, n)
    local first = assert(px:connect{ timeout = 30 })
    assert(first:send_raw("GET /alice/s/echo HTTP/1.1\r\nHost: x\r\nx-test-spin-ms: 300\r\n\r\n"))
    local conns = {}
    for i = 1, n do
        conns[i] = assert(px:connect{ timeout = 30 })
        assert(conns[i]:send_raw(("GET /alice/s/echo?i=%d HTTP/1.1\r\nHost: x\r\n\r\n"):format(i)))
    end
    local r = assert(first:read_response{ timeout = 30 })
    assert.are.equal(200, r.status, r.body)
    first:close()
    for i = 1, n do
        r = assert(conns[i]:read_response{ timeout = 30 })
        assert.are.equal(200, r.status, r.body)
        assert.matches("i=" .. i, r.body, 1, true)
        conns[i]:close()
    end
end

describe("batched writes", function()
    local up, scripts

    setup(function()
        up = H.upstream{ name = "wb" }
        scripts = H.test_router_dir() -- x-test-spin-ms: the loop stands still
    end)

    teardown(function()
        H.stop_all()
    end)

    it("send the writes of one loop iteration together, and none with io_uring_writes=false",
        function()
            local px = H.start{ sandboxes = { H.sandbox("alice", "s", up.port) }, scripts = scripts }
            burst(px, 8)
            local exp = scrape(px)
            local batches = prom.value(exp, "sandbox_proxy_write_batches_total")
            local writes = prom.value(exp, "sandbox_proxy_batched_writes_total")
            assert.is_true(batches >= 1, "no batch was sent")
            assert.is_true(writes >= 2 * batches, ("%d writes in %d batches"):format(writes, batches))

            local off = H.start{ sandboxes = { H.sandbox("alice", "s", up.port) }, scripts = scripts,
                set = { io_uring_writes = false } }
            burst(off, 8)
            exp = scrape(off)
            assert.are.equal(0, prom.value(exp, "sandbox_proxy_write_batches_total"))
            assert.are.equal(0, prom.value(exp, "sandbox_proxy_batched_writes_total"))
        end)

    it("fall back to sending every write at once where a seccomp filter refuses io_uring",
        function()
            -- As a container runtime's seccomp profile does: io_uring_setup(2) fails with EPERM
            -- (a BPF filter installed by a wrapper that then execs the proxy).
            local dir = H.tmpdir()
            local wrapper = dir .. "/no-io-uring"
            assert(process.write_file(wrapper, ([[#!/usr/bin/python3
import ctypes, os, struct, sys
NR_IO_URING_SETUP = 425  # the same number on every architecture since 5.1
prog = b"".join([
    struct.pack("HBBI", 0x20, 0, 0, 0),                      # A = seccomp_data.nr
    struct.pack("HBBI", 0x15, 0, 1, NR_IO_URING_SETUP),      # if A == nr: next, else skip
    struct.pack("HBBI", 0x06, 0, 0, 0x00050000 | 1),         # return ERRNO(EPERM)
    struct.pack("HBBI", 0x06, 0, 0, 0x7fff0000),             # return ALLOW
])
buf = ctypes.create_string_buffer(prog)
fprog = struct.pack("HxxxxxxQ", len(prog) // 8, ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
fp = ctypes.create_string_buffer(fprog)
assert libc.prctl(22, 2, ctypes.addressof(fp), 0, 0) == 0, os.strerror(ctypes.get_errno())  # PR_SET_SECCOMP, FILTER
os.execv(%q, [%q] + sys.argv[1:])
]]):format(H.BIN, H.BIN)))
            assert(os.execute("chmod +x " .. wrapper))
            local real = H.BIN
            H.BIN = wrapper
            local ok, px = pcall(H.start, { sandboxes = { H.sandbox("alice", "s", up.port) },
                scripts = scripts })
            H.BIN = real
            assert(ok, px)
            assert(px:wait_log(function(l)
                return l.msg == "io_uring unavailable: every write is sent at once"
                    and l.error == "Operation not permitted"
            end, 10))
            burst(px, 8)
            for _ = 1, 3 do -- pooled connections, checked when taken
                assert.are.equal(200, assert(px:get("/alice/s/echo")).status)
            end
            local exp = scrape(px)
            assert.are.equal(0, prom.value(exp, "sandbox_proxy_write_batches_total"))
        end)

    it("hand what a client's socket cannot take to libuv, every byte in order", function()
        local px = H.start{ sandboxes = { H.sandbox("alice", "s", up.port) } }
        local N, SIZE = 600, 16000 -- each response (head and body) small enough to be staged
        local c = assert(px:connect{ timeout = 30 })
        local reqs = {}
        for i = 1, N do
            reqs[i] = ("GET /alice/s/bytes/%d HTTP/1.1\r\nHost: x\r\n\r\n"):format(SIZE)
        end
        assert(c:send_raw(table.concat(reqs)))
        -- Not reading: 9.6 MB of answers is more than the socket buffers of both sides hold (by
        -- hand, with a counter: some staged writes were only partly taken and went on in libuv).
        -- Read once the proxy has answered some (then the rest wait on the full socket).
        H.net.wait_until(function()
            local n = 0
            for _, l in ipairs(px:log_lines("stdout")) do
                n = n + (l.path == "/alice/s/bytes/" .. SIZE and 1 or 0)
            end
            return n >= 10
        end, 30, 0.02, "10 answers in the access log")
        local want = pattern(SIZE)
        for i = 1, N do
            local r = assert(c:read_response{ timeout = 30 })
            assert.are.equal(200, r.status)
            assert.are.equal(SIZE, #r.body, "response " .. i)
            assert.is_true(r.body == want, "response " .. i .. " is not the pattern")
        end
        c:close()
        assert.are.equal(200, assert(px:get("/alice/s/echo")).status)
    end)

    it("give a client that stops reading send_timeout once a staged write has to wait", function()
        -- Every answer is small enough to be staged; the ones the full socket does not take wait
        -- in libuv, and from then on the send timeout runs.
        local px = H.start{ sandboxes = { H.sandbox("alice", "s", up.port) },
            set = { send_timeout = 1 } }
        local c = assert(px:connect{ timeout = 30 })
        local reqs = {}
        for i = 1, 600 do
            reqs[i] = "GET /alice/s/bytes/16000 HTTP/1.1\r\nHost: x\r\n\r\n"
        end
        assert(c:send_raw(table.concat(reqs)))
        assert(px:wait_log(function(l)
            return l.msg == "client send timeout"
        end, 20))
        assert.is_true(c:closed_by_peer(20), "the connection stayed open")
        c:close()
    end)

    it("go on with a client's tunnel bytes that came in while a write to it was staged",
        function()
            -- A WebSocket sandbox sends "hello" and the client "ping" while the proxy is stopped
            -- (SIGSTOP), so that one poll reports both, the sandbox's first: relaying "hello"
            -- stages a write to the client, then the client's bytes are read while it is
            -- pending. Once it has gone, "ping" must go on to the sandbox without waiting for
            -- more client bytes (none come: the client waits for the echo).
            local dir = H.tmpdir()
            local port, sb = python_sandbox(dir, [[
import base64, hashlib, os, sys, time
c, _ = s.accept()
head = b''
while b'\r\n\r\n' not in head:
    head += c.recv(4096)
key = [l.split(b':', 1)[1].strip() for l in head.split(b'\r\n') if l.lower().startswith(b'sec-websocket-key:')][0]
acc = base64.b64encode(hashlib.sha1(key + b'258EAFA5-E914-47DA-95CA-C5AB0DC85B11').digest())
c.sendall(b'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n'
          b'Sec-WebSocket-Accept: ' + acc + b'\r\n\r\n')
print('open', flush=True)
while not os.path.exists(%q):
    time.sleep(0.01)
c.sendall(b'\x81\x05hello'); print('sent', flush=True)
def exact(n):
    b = b''
    while len(b) < n:
        d = c.recv(n - len(b))
        if not d:
            sys.exit(0)
        b += d
    return b
while True:
    h = exact(2); n = h[1] & 0x7f; mask = exact(4); p = exact(n)
    p = bytes(x ^ mask[i %% 4] for i, x in enumerate(p))
    out = b'echo:' + p
    c.sendall(bytes([0x81, len(out)]) + out)
]], dir .. "/go")
            local px = H.start{ sandboxes = { H.sandbox("alice", "ws", port) } }
            local c = assert(ws.connect{ host = "127.0.0.1", port = px.port, path = "/alice/ws/x" })
            assert(sb:wait_output("open", 10))
            assert(px.proc:signal("STOP"))
            H.net.wait_until(function()
                local st = process.read_file("/proc/" .. px:pid() .. "/stat") or ""
                return st:match("^%d+ %b() (%a)") == "T"
            end, 10, 0.01, "the proxy stopped")
            assert(process.write_file(dir .. "/go", "go"))
            assert(sb:wait_output("sent", 10))
            assert(c:send_text("ping"))
            assert(px.proc:signal("CONT"))
            local op, msg = c:receive(10)
            assert.are.equal("text", op)
            assert.are.equal("hello", msg)
            op, msg = c:receive(10)
            assert.are.equal("text", op, "the client's ping was held back")
            assert.are.equal("echo:ping", msg)
            c:close()
            sb:stop(0)
        end)

    it("do not use a pooled sandbox connection that got bytes while the request was decided",
        function()
            -- The sandbox answers, then 150 ms later writes a stray 408 on the same idle
            -- connection (as some servers do before closing). The next request arrives at once
            -- and the router spins 400 ms: the stray bytes come in after the loop's poll, while
            -- the pooled connection is being taken.
            local dir = H.tmpdir()
            local port, sb = python_sandbox(dir, [[
import threading, time
def serve(c):
    buf = b''
    while True:
        while b'\r\n\r\n' not in buf:
            d = c.recv(65536)
            if not d:
                return
            buf += d
        head, buf = buf.split(b'\r\n\r\n', 1)
        path = head.split(b' ')[1]
        body = path.rsplit(b'/', 1)[1]
        c.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: %%d\r\n\r\n' %% len(body) + body)
        if body == b'first':
            def stray():
                time.sleep(0.15)
                c.sendall(b'HTTP/1.1 408 Request Timeout\r\nContent-Length: 5\r\n\r\nstray')
            threading.Thread(target=stray, daemon=True).start()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
]])
            local px = H.start{ sandboxes = { H.sandbox("alice", "stray", port) }, scripts = scripts }
            local c = assert(px:connect{ timeout = 30 })
            assert(c:send_raw("GET /alice/stray/first HTTP/1.1\r\nHost: x\r\n\r\n"))
            local r = assert(c:read_response{ timeout = 30 })
            assert.are.equal("first", r.body)
            assert(c:send_raw("GET /alice/stray/second HTTP/1.1\r\nHost: x\r\nx-test-spin-ms: 400\r\n\r\n"))
            r = assert(c:read_response{ timeout = 30 })
            assert.are.equal(200, r.status, r.body)
            assert.are.equal("second", r.body)
            c:close()
            assert(px:wait_log(function(l)
                return l.msg == "upstream sent bytes on an idle connection: closed"
            end, 10))
            sb:stop(0)
        end)
end)
