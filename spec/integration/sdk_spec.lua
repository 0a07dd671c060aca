-- The official agent-sandbox Python SDK (k8s_agent_sandbox, run from ../shared/third_party, never
-- copied) against the real proxy and a real sandbox runtime: the proxy as a drop-in for the
-- official sandbox-router.
--
-- Who runs what, and why:
--   * the sandbox: the agent-sandbox python runtime (examples/python-runtime-sandbox/main.py:
--     FastAPI + uvicorn) under Debian's /usr/bin/python3, which has python3-fastapi,
--     python3-uvicorn and python3-multipart (.ci/packages); it really runs the commands, in a
--     temporary SANDBOX_BASE_DIR;
--   * the SDK: spec/fixtures/sdk_client.py under the python3 on PATH (the machines' pyenv 3.11:
--     the SDK needs pydantic 2, Debian bookworm has 1.10), with Debian's dist-packages appended
--     for python3-kubernetes and python3-prometheus-client;
--   * the Kubernetes API (header mode): the stand-in spec/fixtures/kube_apiserver.py, read by
--     the proxy's watch and by the SDK's own K8sHelper (for X-Sandbox-Pod-IP).
-- The header-routed error bodies and the "delivered" field are checked with the fixture sandbox
-- (spec/fixtures/upstream.py), which can refuse, hang and break exchanges on demand.
local H = require "spec.helpers.proxy"
local K = require "spec.helpers.kube"
local process = require "spec.helpers.process"
local net = require "spec.helpers.net"
local http = require "spec.helpers.http"
local crypto = require "sp.crypto"
local cjson = require "cjson"

local THIRD = H.SOURCE_DIR .. "/../shared/third_party/agent-sandbox"
local SDK_DIR = THIRD .. "/clients/python/agentic-sandbox-client"
local RUNTIME_DIR = THIRD .. "/examples/python-runtime-sandbox"
local SYS_PY = "/usr/bin/python3"
local SDK_PY = os.getenv("SP_SDK_PYTHON") or "python3"
local DRIVER = H.SOURCE_DIR .. "/spec/fixtures/sdk_client.py"
local KEY = "alice-sdk-key-0123456789"

-- Everything the SDK specs need, or nil and what is missing.
local function missing()
    if not process.read_file(SDK_DIR .. "/k8s_agent_sandbox/connector.py") then
        return "the agent-sandbox SDK sources (" .. SDK_DIR .. ")"
    end
    if not process.read_file(RUNTIME_DIR .. "/main.py") then
        return "the agent-sandbox python runtime (" .. RUNTIME_DIR .. ")"
    end
    if os.execute(SYS_PY .. " -c 'import fastapi, uvicorn, multipart' 2>/dev/null") ~= 0 then
        return "python3-fastapi, python3-uvicorn, python3-multipart (Debian) for the runtime"
    end
    local probe = SDK_PY .. " -c \"import sys; sys.path.append('/usr/lib/python3/dist-packages');"
        .. " import pydantic, kubernetes, prometheus_client, requests;"
        .. " sys.exit(0 if pydantic.VERSION.startswith('2.') else 1)\" 2>/dev/null"
    if os.execute(probe) ~= 0 then
        return SDK_PY .. " with pydantic 2 and requests (pyenv), plus Debian's "
            .. "python3-kubernetes and python3-prometheus-client, for the SDK"
    end
    return nil
end

-- Like H.need_tool: fails in CI, says so loudly elsewhere.
local function need_sdk()
    local what = missing()
    if not what then
        return true
    end
    local msg = "missing " .. what
    if os.getenv("CI") and os.getenv("CI") ~= "" and os.getenv("CI") ~= "false" then
        error(msg .. ": in CI every tool the suite uses must be installed (.ci/packages)", 2)
    end
    io.stderr:write("\n*** SKIPPED: " .. msg .. ": this check did NOT run ***\n")
    return false, "SKIPPED: " .. msg
end

-- Starts the python runtime; returns { port, base, proc }.
local function new_runtime()
    local dir = H.tmpdir()
    local base = dir .. "/base"
    assert(os.execute("mkdir -p " .. base) == 0)
    local port = assert(net.free_port())
    local p = assert(process.spawn{
        cmd = { SYS_PY, "-m", "uvicorn", "--app-dir", RUNTIME_DIR, "--host", "127.0.0.1",
            "--port", tostring(port), "--log-level", "warning", "main:app" },
        env = { SANDBOX_BASE_DIR = base, PYTHONPATH = false },
        cwd = base, stdout = dir .. "/stdout.log", stderr = dir .. "/stderr.log" })
    assert(net.wait_port("127.0.0.1", port, 30, p))
    return { port = port, base = base, proc = p }
end

-- One runtime for the whole file (each test uses its own files in it).
local shared_runtime
local function start_runtime()
    if not (shared_runtime and shared_runtime.proc:alive()) then
        shared_runtime = new_runtime()
    end
    return shared_runtime
end

-- Runs the SDK driver to its end; returns its JSON lines, exit code and the raw output.
local function run_sdk(args, env)
    local dir = H.tmpdir()
    local cmd = { SDK_PY, "-u", DRIVER, "--sdk", SDK_DIR }
    for _, a in ipairs(args) do
        cmd[#cmd + 1] = a
    end
    env = env or {}
    env.PYTHONPATH = false
    if env.NETRC == nil then
        env.NETRC = dir .. "/no-netrc" -- never the user's own ~/.netrc
    end
    local p = assert(process.spawn{ cmd = cmd, env = env,
        stdout = dir .. "/out.log", stderr = dir .. "/err.log" })
    return p, function()
        local code = p:wait(120)
        assert(code, "the SDK driver did not finish")
        local out = process.read_file(dir .. "/out.log") or ""
        local lines = {}
        for l in out:gmatch("[^\n]+") do
            lines[#lines + 1] = cjson.decode(l)
        end
        return lines, code, out .. (process.read_file(dir .. "/err.log") or "")
    end
end

local function by_step(lines)
    local t = {}
    for _, l in ipairs(lines) do
        t[l.step] = l
    end
    return t
end

-- Access-log lines (stdout) of px matching method and path.
local function access(px, method, path)
    local out = {}
    for _, l in ipairs(px:log_lines("stdout")) do
        if l.method == method and l.path == path then
            out[#out + 1] = l
        end
    end
    return out
end

local function keys_file(dir)
    local path = dir .. "/keys.json"
    assert(process.write_file(path, cjson.encode{ keys = {
        { user = "alice", sha256 = crypto.hex(crypto.sha256(KEY)) } } }))
    return path
end

describe("the agent-sandbox SDK", function()
    teardown(function()
        H.stop_all()
    end)

    describe("in direct mode with HTTP Basic credentials in api_url", function()
        local rt, px, dir, ok, why

        setup(function()
            ok, why = need_sdk()
            if not ok then
                return
            end
            rt = start_runtime()
            dir = H.tmpdir()
            px = H.start{
                sandboxes = { H.sandbox("alice", "py", rt.port),
                    H.sandbox(nil, "pool-x7k2p", rt.port) },
                config = "return { auth = { keys_file = " .. string.format("%q", keys_file(dir))
                    .. " } }",
            }
        end)

        it("executes, writes and reads back 5 MiB, lists and checks existence", function()
            if not ok then
                pending(why)
                return
            end
            local _, finish = run_sdk{ "--api-url", "http://sdk:" .. KEY .. "@127.0.0.1:" .. px.port,
                "--sandbox", "py", "--port", tostring(rt.port),
                "--steps", "execute,write-read,list,exists", "--command", "echo hello sdk" }
            local lines, code, raw = finish()
            assert.are.equal(0, code, raw)
            local s = by_step(lines)
            assert.are.same({ step = "execute", stdout = "hello sdk\n", stderr = "", exit_code = 0 },
                s.execute)
            assert.are.equal(5 * 1024 * 1024, s["write-read"].size)
            assert.is_true(s["write-read"].same)
            assert.are.same({ "sdk" }, s.list.names)
            assert.is_true(s.exists.exists)
            -- the runtime really wrote the file the SDK sent
            local f = assert(io.open(rt.base .. "/sdk/big.bin", "rb"))
            local data = f:read("*a")
            f:close()
            assert.are.equal(s["write-read"].sha256, crypto.hex(crypto.sha256(data)))
            -- each SDK request was header-routed to alice's sandbox as alice (the access log is
            -- flushed every access_log_flush: wait for the last request's line first)
            H.net.wait_until(function()
                return #access(px, "GET", "/download/sdk%2Fbig.bin") >= 1
            end, 10, 0.05, "the access-log line of the download")
            local ex = access(px, "POST", "/execute")
            assert.are.equal(1, #ex)
            assert.are.equal(200, ex[1].status)
            assert.are.equal("alice", ex[1].user)
            assert.are.equal("py", ex[1].sandbox)
            assert.are.equal(1, #access(px, "POST", "/upload"))
            assert.are.equal(1, #access(px, "GET", "/download/sdk%2Fbig.bin"))
        end)

        it("sends the key from a netrc file (NETRC) when api_url has none, as in tunnel mode", function()
            if not ok then
                pending(why)
                return
            end
            -- tunnel mode's base URL is http://127.0.0.1:<port> with no credentials; the SDK's
            -- requests session then reads $NETRC (or ~/.netrc) for that host: the same session
            -- code runs here with api_url on 127.0.0.1
            local netrc = dir .. "/netrc"
            assert(process.write_file(netrc, "machine 127.0.0.1 login sdk password " .. KEY .. "\n"))
            local _, finish = run_sdk({ "--api-url", "http://127.0.0.1:" .. px.port,
                "--sandbox", "py", "--port", tostring(rt.port), "--command", "echo netrc" },
                { NETRC = netrc })
            local lines, code, raw = finish()
            assert.are.equal(0, code, raw)
            assert.are.equal("netrc\n", lines[1].stdout)
        end)

        it("gets 401 {\"detail\"} for a wrong key, and 404 for an unowned sandbox it may not reach",
            function()
                if not ok then
                    pending(why)
                    return
                end
                local _, finish = run_sdk{ "--api-url", "http://sdk:wrong@127.0.0.1:" .. px.port,
                    "--sandbox", "py", "--port", tostring(rt.port) }
                local lines, code = finish()
                assert.are.equal(1, code)
                assert.are.equal(401, lines[1].status)
                assert.are.equal("invalid credentials", cjson.decode(lines[1].body).detail)
                _, finish = run_sdk{ "--api-url", "http://sdk:" .. KEY .. "@127.0.0.1:" .. px.port,
                    "--sandbox", "pool-x7k2p", "--port", tostring(rt.port) }
                lines, code = finish()
                assert.are.equal(1, code)
                assert.are.equal(404, lines[1].status)
                assert.matches("(or not yours)", cjson.decode(lines[1].body).detail, 1, true)
            end)
    end)

    describe("retrying a proxy 503 (POST /execute included)", function()
        local rt, px, ok, why

        setup(function()
            ok, why = need_sdk()
            if not ok then
                return
            end
            rt = start_runtime()
            px = H.start{
                sandboxes = { H.sandbox(nil, "starting", rt.port, { ready = false }) },
                config = "return { sandbox_headers = { retry_after = 1 } }",
            }
        end)

        it("runs the command once: the 503s never reached the sandbox", function()
            if not ok then
                pending(why)
                return
            end
            local _, finish = run_sdk{ "--api-url", "http://127.0.0.1:" .. px.port,
                "--sandbox", "starting", "--port", tostring(rt.port),
                "--command", "sh -c 'echo run >> runs.txt'" }
            -- the SDK got a 5xx (503: sandbox not ready) and will retry (after Retry-After: 1)
            px:wait_log(function(l)
                return l.method == "POST" and l.path == "/execute" and l.status >= 500
            end, 30, "stdout")
            H.write_sandboxes(px.sandboxes_file, { H.sandbox(nil, "starting", rt.port) })
            local lines, code, raw = finish()
            assert.are.equal(0, code, raw)
            assert.are.equal(0, lines[1].exit_code)
            assert.are.equal("run\n", process.read_file(rt.base .. "/runs.txt"))
            -- the access log is flushed every access_log_flush: wait for the 200's line
            local ex = H.net.wait_until(function()
                local e = access(px, "POST", "/execute")
                return #e >= 1 and e[#e].status == 200 and e
            end, 10, 0.05, "the access-log line of the executed POST")
            assert.is_true(#ex >= 2)
            assert.are.equal(200, ex[#ex].status)
            for i = 1, #ex - 1 do
                assert.are.equal(503, ex[i].status)
                assert.is_nil(ex[i].upstream) -- answered by the proxy: nothing went upstream
            end
        end)
    end)

    describe("in header mode, reading the Sandbox from the Kubernetes API (X-Sandbox-Pod-IP)", function()
        local rt, api, px, dir, ok, why

        setup(function()
            ok, why = need_sdk()
            if not ok then
                return
            end
            rt = start_runtime()
            api = K.start{}
            api:put(H.sandbox(nil, "sdk-sb", rt.port, { namespace = "team-a" }))
            px = api:proxy{}
            dir = H.tmpdir()
        end)

        it("executes and lists through the headers the SDK sends", function()
            if not ok then
                pending(why)
                return
            end
            local kubeconfig = dir .. "/kubeconfig"
            assert(process.write_file(kubeconfig, table.concat({
                "apiVersion: v1", "kind: Config",
                "clusters: [{name: c, cluster: {server: '" .. api.url .. "'}}]",
                "users: [{name: u, user: {token: sdk-token}}]",
                "contexts: [{name: x, context: {cluster: c, user: u}}]",
                "current-context: x", "" }, "\n")))
            local _, finish = run_sdk{ "--api-url", "http://127.0.0.1:" .. px.port,
                "--sandbox", "sdk-sb", "--namespace", "team-a", "--port", tostring(rt.port),
                "--kubeconfig", kubeconfig, "--steps", "execute,list", "--command", "echo via headers" }
            local lines, code, raw = finish()
            assert.are.equal(0, code, raw)
            local s = by_step(lines)
            assert.are.equal("via headers\n", s.execute.stdout)
            local names = {}
            local ls = assert(io.popen("ls -A " .. rt.base))
            for n in ls:lines() do
                names[#names + 1] = n
            end
            ls:close()
            table.sort(names)
            assert.are.same(names, s.list.names)
            -- the SDK read the Sandbox (for its pod IP) from the API, with its own token
            local got = false
            for _, l in ipairs(api:log_of("get")) do
                if l.path:find("/namespaces/team-a/sandboxes/sdk-sb", 1, true) and l.token == "sdk-token" then
                    got = true
                end
            end
            assert.is_true(got, "the SDK never read its Sandbox from the API")
        end)
    end)
end)

describe("header-routed upstream failures", function()
    local up, px, dead

    setup(function()
        up = H.upstream{ name = "hdr" }
        dead = assert(net.free_port())
        px = H.start{
            sandboxes = { H.sandbox(nil, "live", up.port), H.sandbox(nil, "dead", dead),
                H.sandbox("echo", "other", dead) },
            set = { connect_retries = 0 },
        }
    end)

    teardown(function()
        H.stop_all()
    end)

    local function hdr(id, port, more)
        local h = { { "X-Sandbox-ID", id }, { "X-Sandbox-Port", tostring(port) } }
        for _, kv in ipairs(more or {}) do
            h[#h + 1] = kv
        end
        return h
    end

    local function last_log(path)
        return px:wait_log(function(l) return l.path == path and l.status >= 500 end, 10, "stdout")
    end

    it("502 'Could not connect to the backend sandbox: ID', delivered false", function()
        local r = assert(px:request{ method = "POST", path = "/execute", body = "{}",
            headers = hdr("dead", dead) })
        assert.are.equal(502, r.status)
        local b = cjson.decode(r.body)
        assert.are.equal("Could not connect to the backend sandbox: dead", b.detail)
        assert.are.equal(false, b.delivered)
        assert.are.equal("upstream connect failed", b.error)
        local l = last_log("/execute")
        assert.are.equal(false, l.delivered)
        assert.are.equal("upstream connect failed", l.error)
    end)

    it("504 'Timed out waiting for the backend sandbox: ID' after X-Sandbox-Timeout, delivered true",
        function()
            local r = assert(px:request{ path = "/delay?ms=5000",
                headers = hdr("live", up.port, { { "X-Sandbox-Timeout", "0.3" } }) })
            assert.are.equal(504, r.status)
            local b = cjson.decode(r.body)
            assert.are.equal("Timed out waiting for the backend sandbox: live", b.detail)
            assert.are.equal(true, b.delivered)
            assert.are.equal(true, last_log("/delay").delivered)
        end)

    it("502 'Lost the connection to the backend sandbox: ID' for a broken answer, delivered true",
        function()
            local r = assert(px:request{ method = "POST", path = "/garbage", body = "x",
                headers = hdr("live", up.port) })
            assert.are.equal(502, r.status)
            local b = cjson.decode(r.body)
            assert.are.equal("Lost the connection to the backend sandbox: live", b.detail)
            assert.are.equal(true, b.delivered)
        end)

    it("path-routed failures keep the plain shape, with delivered", function()
        local r = assert(px:request{ path = "/default/dead/x" })
        assert.are.equal(502, r.status)
        local b = cjson.decode(r.body)
        assert.is_nil(b.detail)
        assert.are.equal("upstream connect failed", b.error)
        assert.are.equal(false, b.delivered)
    end)

    it("strips every X-Sandbox-* header; headers win over the path, which goes untouched",
        function()
            -- /echo/other names the path route echo/other (on the dead port); the headers win
            local r = assert(px:request{ path = "/echo/other?x=1", headers = hdr("live", up.port, {
                { "X-Sandbox-Namespace", "default" }, { "X-Sandbox-Timeout", "30" },
                { "X-Sandbox-Pod-IP", "127.0.0.1" }, { "X-Sandbox-UID", "u-1" },
                { "X-Other", "kept" } }) })
            assert.are.equal(200, r.status)
            local e = cjson.decode(r.body)
            assert.are.equal("/echo/other?x=1", e.target) -- untouched, to "live"
            for _, h in ipairs(e.headers) do
                assert.is_nil(h[1]:lower():match("^x%-sandbox%-"), h[1])
            end
            local other = false
            for _, h in ipairs(e.headers) do
                other = other or (h[1] == "X-Other" and h[2] == "kept")
            end
            assert.is_true(other)
        end)

    it("answers GET /healthz {\"status\":\"ok\"}", function()
        local r = assert(px:request{ path = "/healthz" })
        assert.are.equal(200, r.status)
        assert.are.same({ status = "ok" }, cjson.decode(r.body))
    end)
end)
