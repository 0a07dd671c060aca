-- gRPC through the proxy, against the real binary, a real gRPC server as the sandbox and a
-- real gRPC client (Debian python3-grpcio; the proto, spec/fixtures/grpc/proc.proto, is
-- compiled with python3-grpc-tools at start into a temporary directory). Both run under
-- /usr/bin/python3, where Debian's python3-* packages live (pyenv's python3 has no grpc).
-- The client speaks HTTP/2 with prior knowledge to the proxy, which relays each call to the
-- sandbox over h2c (calls to one sandbox multiplexed over one kept connection, closed after
-- upstream_keepalive_timeout idle; the peer address the server sees tells): routed by the
-- official router's metadata (x-sandbox-id, -namespace, -port); unary, server streaming of 10,000 messages to a slow reader with the proxy's memory
-- bounded, a 100 MB client-streaming upload, bidirectional streaming, status and trailers
-- relayed, a deadline the proxy enforces itself (grpc-timeout; the sandbox gets what is left
-- of it after a script held the call), a client cancel that reaches
-- the server, any request to a port listed in h2c_upstream_ports relayed over h2c, host
-- routing (a call whose :authority is {port}-{sandbox}--{user}.{base_domain} reaches that
-- port, with auth and the owner check), a sandbox addressed by a name (its serviceFQDN;
-- "localhost" here, which the server binds on every loopback address), and the proxy's own refusals as gRPC statuses
-- (NOT_FOUND, UNAVAILABLE, UNAUTHENTICATED, PERMISSION_DENIED).
local H = require "spec.helpers.proxy"
local process = require "spec.helpers.process"
local crypto = require "sp.crypto"
local cjson = require "cjson"

local PY = "/usr/bin/python3"
local FIXTURE = H.SOURCE_DIR .. "/spec/fixtures/grpc/grpc_fixture.py"
local H2CLIENT = H.SOURCE_DIR .. "/spec/fixtures/h2client.py"

local function grpc_available()
    return os.execute(PY .. " -c 'import grpc, grpc_tools' >/dev/null 2>&1") == 0
end

local function sh(cmd)
    local f = assert(io.popen(cmd .. " 2>&1"))
    local out = f:read("*a")
    f:close()
    return out
end

describe("gRPC", function()
    local gport, events, px, meta

    -- one call through the proxy; returns the client's JSON result
    local function call(scenario, extra_meta, port)
        local m = meta .. (extra_meta or "")
        local out = sh(("%s %s call --port %d %s %s"):format(PY, FIXTURE, port or px.port, m, scenario))
        local line = out:match("(%b{})%s*$")
        assert(line, "grpc client: " .. out)
        return cjson.decode(line)
    end

    -- A gRPC message (protobuf bytes) in its length-prefixed frame, as hex for h2client --data.
    local function grpc_hex(msg)
        local frame = "\0" .. string.char(0, 0, 0, #msg) .. msg
        return (frame:gsub(".", function(ch) return ("%02x"):format(ch:byte()) end))
    end

    -- A sandbox that accepts one connection and never answers; prints "accepted" once it has.
    -- Returns its port and process.
    local function silent_sandbox(dir)
        local port = assert(H.net.free_port())
        local p = assert(process.spawn{ cmd = { H.PYTHON, "-c", ("import socket,sys,time\n"
            .. "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            .. "s.bind(('127.0.0.1', %d)); s.listen(8); print('up', flush=True)\n"
            .. "c=s.accept(); print('accepted', flush=True); time.sleep(60)"):format(port) },
            stdout = dir .. "/silent" })
        assert(p:wait_output("up", 20))
        return port, p
    end

    setup(function()
        if not grpc_available() then
            local msg = "python3-grpcio / python3-grpc-tools are not installed for /usr/bin/python3"
            if os.getenv("CI") and os.getenv("CI") ~= "" and os.getenv("CI") ~= "false" then
                error(msg .. ": in CI every tool the suite uses must be installed (.ci/packages)")
            end
            io.stderr:write("\n*** SKIPPED: " .. msg .. ": this check did NOT run ***\n")
            return
        end
        local dir = H.tmpdir()
        events = dir .. "/events"
        gport = assert(H.net.free_port())
        local srv = assert(process.spawn{ cmd = { PY, FIXTURE, "serve", "--port", gport,
            "--events", events }, stdout = dir .. "/srv.out", stderr = dir .. "/srv.err" })
        assert(srv:wait_output("listening on", 30, "stderr"))
        px = H.start{ sandboxes = { H.sandbox("a", "b", gport) } }
        meta = ("--meta x-sandbox-id=b --meta x-sandbox-port=%d"):format(gport)
    end)

    teardown(function()
        H.stop_all()
    end)

    local function need()
        if not px then
            pending("SKIPPED: no grpcio for /usr/bin/python3")
            return false
        end
        return true
    end

    it("relays a unary call routed by x-sandbox-* metadata, with its trailers", function()
        if not need() then return end
        local r = call("unary")
        assert.is_true(r.ok, r.details)
        local md = cjson.decode(r.text)
        assert.is_nil(md["x-sandbox-id"]) -- the routing metadata stays with the proxy
        assert.truthy(md["x-request-id"])
        assert.are.equal("0", r.trailers["x-exit-code"])
        local line = px:wait_log(function(l) return l.request_id == md["x-request-id"] end, 10,
            "stdout")
        assert.are.equal("/spx.Proc/Run", line.path)
        assert.are.equal(200, line.status)
    end)

    it("relays an error status and message from the server", function()
        if not need() then return end
        local r = call("fail")
        assert.is_false(r.ok)
        assert.are.equal("FAILED_PRECONDITION", r.code)
        assert.are.equal("no such process", r.details)
    end)

    it("streams 10,000 messages to a slow reader with the proxy's memory bounded", function()
        if not need() then return end
        local rss0 = px:rss_kib()
        local peak = rss0
        local dir = H.tmpdir()
        -- 10,000 x 10 KB = 100 MB; the reader pauses 50 ms every 100 messages (5 s in all)
        local p = assert(process.spawn{ cmd = { PY, FIXTURE, "call", "--port", px.port,
            "--meta", "x-sandbox-id=b", "--meta", "x-sandbox-port=" .. gport, "stream", "10000",
            "10000", "50" }, stdout = dir .. "/out", stderr = dir .. "/err" })
        H.net.wait_until(function()
            peak = math.max(peak, px:rss_kib() or 0)
            return not p:alive()
        end, 120, 0.05)
        local r = cjson.decode(assert(process.read_file(dir .. "/out")):match("(%b{})"))
        assert.is_true(r.ok, r.details)
        assert.are.equal(10000, r.messages)
        assert.are.equal(100000000, r.bytes)
        assert.is_true(peak - rss0 < 32 * 1024, ("proxy RSS grew %d KiB"):format(peak - rss0))
    end)

    it("relays a 100 MB client-streaming upload intact", function()
        if not need() then return end
        local r = call("upload 100")
        assert.is_true(r.ok, r.details)
        assert.are.equal(100 * 1024 * 1024, r.n)
        assert.is_true(r.sha_ok)
    end)

    it("relays a bidirectional stream", function()
        if not need() then return end
        local r = call("chat 200")
        assert.is_true(r.ok, r.details)
        assert.are.equal(200, r.replies)
        assert.is_true(r.ok_replies)
    end)

    it("ends a call at its grpc-timeout itself", function()
        if not need() then return end
        -- a sandbox that accepts and never answers (so no deadline but the proxy's can end the
        -- call) and a raw HTTP/2 client that does not enforce its own deadline: the proxy must
        local silent = silent_sandbox(H.tmpdir())
        -- Cmd{command="sleep", delay_ms=10000, tag="raw-deadline"} in a gRPC frame
        local hex = grpc_hex("\10\5sleep" .. "\24\144\78" .. "\42\12raw-deadline")
        local out = sh(("%s %s --port %d streams --req /spx.Proc/Run --header content-type=application/grpc "
            .. "--header grpc-timeout=300m --header x-sandbox-id=b --header x-sandbox-port=%d --data %s")
            :format(H.PYTHON, H2CLIENT, px.port, silent, hex))
        local s1 = cjson.decode(out:match("(%b{})"))
        assert.is_true(s1["end"]) -- answered (trailers-only DEADLINE_EXCEEDED), not reset
        assert.are.equal(0, s1.data)
        assert.matches("deadline exceeded %(grpc%-timeout%)", px:stderr())
        -- the stock client sees DEADLINE_EXCEEDED, and the server's call is cancelled
        local r = call("deadline 300")
        assert.are.equal("DEADLINE_EXCEEDED", r.code)
        H.net.wait_until(function()
            return (process.read_file(events) or ""):find("cancelled deadline", 1, true)
        end, 10)
    end)

    it("forwards what is left of grpc-timeout after the time spent in the proxy", function()
        if not need() then return end
        -- an override router holds a call for x-test-hold-ms (as a wake would)
        local dir = H.test_router_dir()
        local pxw = H.start{ sandboxes = { H.sandbox("a", "b", gport) }, scripts = dir }
        -- the stock client's deadline is 10 s; held 1.5 s, the server must get at most 8.5 s
        -- (the client's own value would leave it about 10 s; load only lowers what is left)
        local r = call("unary", " --meta x-test-hold-ms=1500", pxw.port)
        assert.is_true(r.ok, r.details)
        local left = tonumber(cjson.decode(r.text)["x-time-remaining"])
        assert.is_true(left > 0 and left < 9.0, "the server's time remaining: " .. tostring(left))
        -- a budget spent before forwarding: DEADLINE_EXCEEDED from the proxy, nothing dialled
        -- (a raw client that does not enforce its own deadline)
        local hex = grpc_hex("\10\5hello")
        local out = sh(("%s %s --port %d streams --req /spx.Proc/Run --header content-type=application/grpc "
            .. "--header grpc-timeout=300m --header x-test-hold-ms=600 --header x-sandbox-id=b "
            .. "--header x-sandbox-port=%d --data %s"):format(H.PYTHON, H2CLIENT, pxw.port, gport, hex))
        local first = assert(out:match("(%b{})"), out)
        local s1 = cjson.decode(first)
        assert.is_true(s1["end"])
        assert.are.equal(0, s1.data)
        local line = pxw:wait_log(function(l) return l.status == 504 end, 10, "stdout")
        assert.are.equal("/spx.Proc/Run", line.path)
        assert.is_false(line.delivered)
    end)

    it("counts a call's deadline from now even after a long loop iteration", function()
        if not need() then return end
        -- An override router spins (no yield) for x-test-spin-ms, so the loop's cached time falls
        -- that far behind; the call then goes straight onto an open h2c connection to a sandbox
        -- that never answers. Its timer must be counted from the real time: armed from the
        -- stale loop time it fired that much before the deadline and ended the call as an
        -- "upstream first byte timeout" instead.
        local dir = H.test_router_dir()
        local silent, sp = silent_sandbox(dir)
        local pxs = H.start{ sandboxes = { H.sandbox("a", "b", gport) }, scripts = dir }
        local hex = grpc_hex("\10\5hello")
        local function raw(extra)
            return { H.PYTHON, H2CLIENT, "--port", tostring(pxs.port), "--timeout", "20",
                "streams", "--req", "/spx.Proc/Run", "--header", "content-type=application/grpc",
                "--header", "x-sandbox-id=b", "--header", "x-sandbox-port=" .. silent,
                "--data", hex, unpack(extra) }
        end
        -- a first call opens the connection and waits on it (the sandbox is silent)
        local first = assert(process.spawn{ cmd = raw{ "--header", "grpc-timeout=15S" },
            stdout = dir .. "/first" })
        assert(sp:wait_output("accepted", 20))
        -- the second: 1 s of budget, 300 ms of it spun away in one loop iteration
        local out = sh(table.concat(raw{ "--header", "grpc-timeout=1000m", "--header",
            "x-test-spin-ms=300" }, " "))
        local s2 = cjson.decode((assert(out:match("(%b{})"), out)))
        assert.is_true(s2["end"]) -- answered (trailers-only DEADLINE_EXCEEDED), not reset
        local err = pxs:stderr()
        assert.matches("deadline exceeded %(grpc%-timeout%)", err)
        assert.is_nil(err:find("upstream first byte timeout", 1, true), err)
        first:kill()
    end)

    it("cancels the server's call when the client cancels (RST_STREAM)", function()
        if not need() then return end
        local r = call("cancel client-cancel")
        assert.is_true(r.cancelled)
        H.net.wait_until(function()
            return (process.read_file(events) or ""):find("cancelled client-cancel", 1, true)
        end, 10)
    end)

    it("relays any HTTP/2 request to a port listed in h2c_upstream_ports over h2c", function()
        if not need() then return end
        -- a plain GET (not gRPC): over h2c the gRPC server itself answers it (its own error);
        -- over HTTP/1.1 (the port not listed) the gRPC server cannot answer it: 502
        local function get(port)
            return sh(("curl -sS -i --http2-prior-knowledge -H 'x-sandbox-id: b' -H 'x-sandbox-port: %d' "
                .. "http://127.0.0.1:%d/spx.Proc/Run"):format(gport, port))
        end
        local px2 = H.start{ sandboxes = { H.sandbox("a", "b", gport) },
            set = { h2c_upstream_ports = "9090," .. gport } }
        local via_h2c = get(px2.port)
        assert.matches("^HTTP/2 200", via_h2c)
        assert.matches("grpc%-message: Bad method header", via_h2c)
        assert.matches("^HTTP/2 502", get(px.port))
    end)

    it("routes a call by its :authority (host routing) to that sandbox's port, with auth", function()
        if not need() then return end
        -- the sandbox's own port is dead and its annotation allows the gRPC server's port: only
        -- the port named in the host reaches the server; no x-sandbox-* metadata is sent
        local dir = H.tmpdir()
        assert(process.write_file(dir .. "/keys.json", cjson.encode({ keys = {
            { user = "a", sha256 = crypto.hex(crypto.sha256("a-key-1")) },
            { user = "z", sha256 = crypto.hex(crypto.sha256("z-key-1")) } } })))
        local dead = assert(H.net.free_port())
        local sb = H.sandbox("a", "b", dead)
        sb.metadata.annotations["sandbox-proxy.dev/ports"] = tostring(gport)
        local pxh = H.start{ sandboxes = { sb }, config = ([[return {
            auth = { keys_file = %q }, sandbox_path = { base_domain = "sbx.test" } }]])
            :format(dir .. "/keys.json") }
        local host = ("%d-b--a.sbx.test"):format(gport)
        local function hcall(key, authority)
            local m = key and (" --meta 'authorization=Bearer %s'"):format(key) or ""
            local out = sh(("%s %s call --port %d --authority %s%s unary"):format(PY, FIXTURE,
                pxh.port, authority or host, m))
            local line = assert(out:match("(%b{})%s*$"), out)
            return cjson.decode(line)
        end
        local r = hcall("a-key-1")
        assert.is_true(r.ok, r.details)
        local md = cjson.decode(r.text)
        assert.is_nil(md.authorization) -- the credential stays with the proxy
        local line = pxh:wait_log(function(l) return l.request_id == md["x-request-id"] end, 10,
            "stdout")
        assert.are.equal("/spx.Proc/Run", line.path)
        assert.are.equal("a", line.user)
        assert.are.equal("b", line.sandbox)
        assert.are.equal("127.0.0.1:" .. gport, line.upstream)
        -- auth holds on a sandbox host: none, a wrong one, another user's
        assert.are.equal("UNAUTHENTICATED", hcall(false).code)
        assert.are.equal("UNAUTHENTICATED", hcall("not-a-key").code)
        assert.are.equal("PERMISSION_DENIED", hcall("z-key-1").code)
        -- the sandbox's own host reaches its own (dead) port; a port not allowed is refused
        assert.are.equal("UNAVAILABLE", hcall("a-key-1", "b--a.sbx.test").code)
        assert.are.equal("PERMISSION_DENIED", hcall("a-key-1", "1-b--a.sbx.test").code)
    end)

    it("reaches a sandbox addressed by a name (a serviceFQDN), resolved off the loop", function()
        if not need() then return end
        -- ready, no pod IP: the Service name is the address; "localhost" is a name, not an IP
        local sb = H.sandbox("a", "b", gport, { ip = false, service = "localhost" })
        local pxn = H.start{ sandboxes = { sb } }
        local r = call("unary", nil, pxn.port)
        assert.is_true(r.ok, r.details)
        local md = cjson.decode(r.text)
        local line = pxn:wait_log(function(l) return l.request_id == md["x-request-id"] end, 10,
            "stdout")
        assert.are.equal("localhost:" .. gport, line.upstream)
        r = call("stream 50 1000", nil, pxn.port)
        assert.is_true(r.ok, r.details)
        assert.are.equal(50, r.messages)
        -- what the name resolved to meets the address checks: loopback refused unless allowed
        local pxr = H.start{ set = { allow_loopback_sandboxes = false }, sandboxes = { sb } }
        r = call("unary", nil, pxr.port)
        assert.are.equal("UNAVAILABLE", r.code)
        assert.matches("sandbox address refused: loopback", r.details, 1, true)
    end)

    it("multiplexes calls to a sandbox over one h2c connection, kept between calls", function()
        if not need() then return end
        local pxm = H.start{ sandboxes = { H.sandbox("a", "b", gport) },
            set = { upstream_keepalive_timeout = 1 } }
        local function peer_of(r)
            assert.is_true(r.ok, r.details)
            return cjson.decode(r.text)["x-peer"]
        end
        -- a streaming call held open (the server sends nothing after the first message until
        -- told to go on) while unary calls run: all on one connection, whatever the machine's
        -- load makes of the time between the calls
        local dir = H.tmpdir()
        local hold = dir .. "/hold"
        local p = assert(process.spawn{ cmd = { PY, FIXTURE, "call", "--port", pxm.port,
            "--meta", "x-sandbox-id=b", "--meta", "x-sandbox-port=" .. gport, "stream", "2000",
            "1000", "0", hold }, stdout = dir .. "/out", stderr = dir .. "/err" })
        H.net.wait_until(function()
            assert(p:alive() or process.read_file(hold .. ".started"),
                "the streaming call ended early: " .. tostring(process.read_file(dir .. "/err")))
            return process.read_file(hold .. ".started")
        end, 30, 0.02, "the streaming call to start")
        local peers = {}
        for i = 1, 3 do
            peers[i] = peer_of(call("unary", nil, pxm.port))
        end
        -- a call cancelled on the shared connection ends only its own stream at the server
        assert.is_true(call("cancel mux-cancel", nil, pxm.port).cancelled)
        H.net.wait_until(function()
            return (process.read_file(events) or ""):find("cancelled mux-cancel", 1, true)
        end, 10)
        peers[4] = peer_of(call("unary", nil, pxm.port))
        assert.is_true(p:alive(), "the held streaming call ended before the others")
        assert(process.write_file(hold, "go"))
        assert(p:wait(60))
        local s = cjson.decode(assert(process.read_file(dir .. "/out")):match("(%b{})"))
        assert.is_true(s.ok, s.details)
        assert.are.equal(2000, s.messages)
        assert.truthy(peers[1]:match("^ipv4:127%.0%.0%.1:%d+$"), peers[1])
        assert.are.equal(peers[1], peers[2])
        assert.are.equal(peers[1], peers[3])
        assert.are.equal(peers[1], peers[4])
        assert.are.equal(peers[1], s.peer)
        -- idle for upstream_keepalive_timeout: closed by the proxy; the next call opens another
        local lport = tonumber(peers[1]:match(":(%d+)$"))
        local function open()
            local tcp = process.read_file("/proc/net/tcp") or ""
            local pat = (":%04X %%x+:%04X 01 "):format(lport, tonumber(gport))
            return tcp:find(pat) ~= nil
        end
        assert.is_true(open())
        H.net.wait_until(function() return not open() end, 10)
        assert.are_not.equal(peers[1], peer_of(call("unary", nil, pxm.port)))
    end)

    it("answers the proxy's own refusals as gRPC statuses", function()
        if not need() then return end
        local r = cjson.decode(sh(("%s %s call --port %d --meta x-sandbox-id=nosuch unary"):format(PY,
            FIXTURE, px.port)):match("(%b{})%s*$"))
        assert.are.equal("NOT_FOUND", r.code)
        r = cjson.decode(sh(("%s %s call --port %d --meta x-sandbox-id=b --meta x-sandbox-port=1 unary")
            :format(PY, FIXTURE, px.port)):match("(%b{})%s*$"))
        assert.are.equal("UNAVAILABLE", r.code)
        local px2 = H.start{ sandboxes = { H.sandbox("a", "b", gport, { ready = false }) } }
        r = call("unary", nil, px2.port)
        assert.are.equal("UNAVAILABLE", r.code)
        -- with auth on: no credential, UNAUTHENTICATED; a key, through
        local dir = H.tmpdir()
        assert(process.write_file(dir .. "/keys.json", cjson.encode({ keys = {
            { user = "a", sha256 = crypto.hex(crypto.sha256("a-key-1")) } } })))
        local px3 = H.start{ sandboxes = { H.sandbox("a", "b", gport) },
            config = ("return { auth = { keys_file = %q } }"):format(dir .. "/keys.json") }
        r = call("unary", nil, px3.port)
        assert.are.equal("UNAUTHENTICATED", r.code)
        r = call("unary", " --meta 'authorization=Bearer a-key-1'", px3.port)
        assert.is_true(r.ok, r.details)
    end)
end)
