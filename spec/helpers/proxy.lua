-- Integration harness: starts the real sandbox-proxy binary and fixture servers on loopback,
-- waits for readiness (never sleeps as synchronisation), and tears everything down.
--
--   local H = require "spec.helpers.proxy"
--   local up = H.upstream()                        -- spec/fixtures/upstream.py
--   local px = H.start{ sandboxes = { H.sandbox("alice", "sb1", up.port) } }
--   local resp = px:request{ path = "/alice/sb1/echo" }
--   H.stop_all()                                   -- in teardown
--
-- The binary is $SP_BIN (set by ctest), else build/sandbox-proxy.
local process = require "spec.helpers.process"
local net = require "spec.helpers.net"
local http = require "spec.helpers.http"
local cjson = require "cjson"

local M = {}

local SOURCE_DIR = os.getenv("SP_SOURCE_DIR") or "."
M.SOURCE_DIR = SOURCE_DIR
M.BIN = os.getenv("SP_BIN") or (SOURCE_DIR .. "/build/sandbox-proxy")
M.PYTHON = os.getenv("PYTHON") or "python3"

local tmpdirs = {}
local proxies = {}

function M.tmpdir()
    local d = assert(process.tmpdir("sp-spec-"))
    tmpdirs[#tmpdirs + 1] = d
    return d
end

-- A scripts directory whose router, before routing as the built-in one does, holds a request
-- for x-test-hold-ms (a yield, as a wake would) or spins for x-test-spin-ms (no yield: the loop
-- stands still that long, its cached time falls behind and whatever arrives meanwhile waits for
-- the next poll). For specs of the loop's timing; pass it as start{ scripts = ... }.
function M.test_router_dir()
    local dir = M.tmpdir()
    assert(process.write_file(dir .. "/router.lua", [[
local core = require "sp.core"
local timer = require "sp.timer"
local builtin = dofile(core.settings().builtin_dir .. "/router.lua")
local M = {}
function M.handle(req)
    local hold = tonumber(req:header("x-test-hold-ms") or "")
    if hold then
        timer.sleep(hold / 1000)
    end
    local spin = tonumber(req:header("x-test-spin-ms") or "")
    if spin then
        local t0 = os.clock()
        while os.clock() - t0 < spin / 1000 do end
    end
    return builtin.handle(req)
end
return M
]]))
    return dir
end

-- A v1beta1 Sandbox object as the API server returns it. opts: ready (true), ip ("127.0.0.1"),
-- namespace ("default"), reason, service (FQDN), port (annotation), created, mode.
function M.sandbox(user, name, port, opts)
    opts = opts or {}
    local ready = opts.ready ~= false
    local annotations = {}
    if port then
        annotations["sandbox-proxy.dev/port"] = tostring(port)
    end
    local labels = {}
    if user then
        labels.user = user
    end
    return {
        apiVersion = "agents.x-k8s.io/v1beta1",
        kind = "Sandbox",
        metadata = {
            name = name,
            namespace = opts.namespace or "default",
            labels = labels,
            annotations = annotations,
            creationTimestamp = opts.created or "2026-08-20T10:00:00Z",
            resourceVersion = "1",
        },
        spec = { operatingMode = opts.mode or "Running" },
        status = {
            conditions = {
                {
                    type = "Ready",
                    status = ready and "True" or "False",
                    reason = opts.reason or (ready and "DependenciesReady" or "DependenciesNotReady"),
                },
            },
            podIPs = (ready and opts.ip ~= false) and { opts.ip or "127.0.0.1" } or nil,
            serviceFQDN = opts.service,
        },
    }
end

function M.sandbox_list(items)
    return { apiVersion = "agents.x-k8s.io/v1beta1", kind = "SandboxList",
        metadata = { resourceVersion = "1" }, items = items }
end

-- Writes a sandboxes file atomically (write then rename, as tools do).
function M.write_sandboxes(path, items)
    local tmp = path .. ".tmp"
    assert(process.write_file(tmp, cjson.encode(M.sandbox_list(items))))
    assert(os.rename(tmp, path))
end

local Proxy = {}
Proxy.__index = Proxy

-- Starts the proxy. opts:
--   sandboxes = { objects } (written to a file) | sandboxes_file = path
--   args = { extra command-line arguments }, set = { knob = value }, workers = n (default 1)
--   scripts = dir, config = Lua source of a config file, env = { ... },
--   stdout = a path for the access log instead of a file in the proxy's directory (a FIFO, say)
--   ready_path = "/health" (polled until 200; with `sandboxes` and no ready_path, until its
--   source reports synced too, so the sandboxes are routed when start returns), wait = false
--   to skip waiting
function M.start(opts)
    opts = opts or {}
    local dir = M.tmpdir()
    local port = assert(net.free_port())
    local cmd = { M.BIN, "--listen", "127.0.0.1:" .. port, "--workers", tostring(opts.workers or 1) }
    local sfile = opts.sandboxes_file
    if not sfile and opts.sandboxes then
        sfile = dir .. "/sandboxes.json"
        M.write_sandboxes(sfile, opts.sandboxes)
    end
    if sfile then
        cmd[#cmd + 1] = "--sandboxes-file"
        cmd[#cmd + 1] = sfile
    end
    if opts.config then
        local cf = dir .. "/config.lua"
        assert(process.write_file(cf, opts.config))
        cmd[#cmd + 1] = "--config"
        cmd[#cmd + 1] = cf
    end
    if opts.scripts then
        cmd[#cmd + 1] = "--scripts"
        cmd[#cmd + 1] = opts.scripts
    end
    local set = opts.set or {}
    if not set.demo_listen then
        set.demo_listen = "127.0.0.1:0"
    end
    if set.allow_loopback_sandboxes == nil then
        set.allow_loopback_sandboxes = true -- the fixture sandboxes listen on 127.0.0.1
    end
    for k, v in pairs(set) do
        cmd[#cmd + 1] = "--set"
        cmd[#cmd + 1] = k .. "=" .. tostring(v)
    end
    for _, a in ipairs(opts.args or {}) do
        cmd[#cmd + 1] = a
    end
    local env = opts.env or {}
    if env.KUBERNETES_SERVICE_HOST == nil then
        env.KUBERNETES_SERVICE_HOST = false
    end
    if env.KUBECONFIG == nil then
        env.KUBECONFIG = false
    end
    local p = assert(process.spawn{ cmd = cmd, env = env, stdout = opts.stdout or dir .. "/stdout.log",
        stderr = dir .. "/stderr.log" })
    local self = setmetatable({ port = port, host = "127.0.0.1", proc = p, dir = dir,
        sandboxes_file = sfile, cmd = cmd }, Proxy)
    proxies[#proxies + 1] = self
    if opts.wait ~= false then
        local ready_path = opts.ready_path or "/health"
        local ok, err = pcall(net.wait_until, function()
            if not p:alive() then
                error("proxy exited: " .. tostring(p:read_stderr()))
            end
            local r = http.request{ port = port, path = ready_path, timeout = 1 }
            if not (r and r.status == 200) then
                return false
            end
            -- the sandboxes it was given are routed once the source has synced, which the
            -- built-in /health reports (scripts that replace health.lua may not say)
            if opts.sandboxes and not opts.ready_path then
                return not r.body:find('"synced":false', 1, true)
            end
            return true
        end, opts.ready_wait or 20, 0.02, "proxy " .. ready_path)
        if not ok then
            error(tostring(err) .. "\nstderr:\n" .. tostring(p:read_stderr()), 2)
        end
    end
    return self
end

-- Raises if the proxy has exited although the spec never signalled it: a crash is a failure of
-- the spec that caused it, whatever the request in flight returned.
function Proxy:check_alive(level)
    if not self.proc.signalled and not self.proc:alive() then
        local code, how = self.proc:status()
        error(("proxy %d died during the spec (%s %s); stderr tail:\n%s"):format(self.port,
            tostring(how), tostring(code), (self:stderr()):sub(-2000)), (level or 1) + 1)
    end
end

function Proxy:request(opts)
    opts.port = self.port
    opts.host = self.host
    local r, err = http.request(opts)
    if not r then
        self:check_alive(2)
    end
    return r, err
end

function Proxy:get(path, headers)
    local r, err = http.request{ port = self.port, path = path, headers = headers }
    if not r then
        self:check_alive(2)
    end
    return r, err
end

function Proxy:json(path)
    local r = assert(http.request{ port = self.port, path = path })
    return cjson.decode(r.body), r
end

function Proxy:connect(opts)
    return http.connect(self.host, self.port, opts)
end

-- Sends raw bytes on a fresh connection; returns the response (or nil, err) and whether the
-- proxy closed the connection afterwards. method: the request's method (how to read the
-- response: a HEAD response has no body), default GET.
function Proxy:raw(bytes, method)
    local c = assert(self:connect{ timeout = 5 })
    assert(c:send_raw(bytes))
    local r, err = c:read_response{ method = method or "GET", timeout = 5 }
    local closed = c:closed_by_peer(3)
    c:close()
    return r, err, closed
end

function Proxy:stderr()
    return self.proc:read_stderr() or ""
end

function Proxy:stdout()
    return self.proc:read_stdout() or ""
end

-- Every JSON log line of a stream ("stderr" or "stdout") decoded; bad lines are errors.
function Proxy:log_lines(stream)
    local text = stream == "stdout" and self:stdout() or self:stderr()
    local out = {}
    for line in text:gmatch("[^\n]+") do
        local ok, v = pcall(cjson.decode, line)
        if not ok then
            error("log line is not JSON: " .. line)
        end
        out[#out + 1] = v
    end
    return out
end

-- Waits until a log line satisfies pred(line); returns it.
function Proxy:wait_log(pred, timeout, stream)
    return net.wait_until(function()
        for _, l in ipairs(self:log_lines(stream)) do
            if pred(l) then
                return l
            end
        end
    end, timeout or 10, 0.02, "log line")
end

function Proxy:pid()
    return self.proc:pid()
end

-- Resident set size in KiB (from /proc).
function Proxy:rss_kib()
    local s = process.read_file("/proc/" .. self.proc:pid() .. "/status")
    return s and tonumber(s:match("VmRSS:%s*(%d+)"))
end

-- A deliberate stop (SIGTERM, then SIGKILL after the timeout).
function Proxy:stop(timeout)
    self.proc.signalled = self.proc.signalled or {}
    return self.proc:stop(timeout or 10)
end

-- Starts spec/fixtures/upstream.py. opts: name, listen_after_ms, wait (true), port (default:
-- a free one).
function M.upstream(opts)
    opts = opts or {}
    local dir = M.tmpdir()
    local port = opts.port or assert(net.free_port())
    local cmd = { M.PYTHON, "-u", SOURCE_DIR .. "/spec/fixtures/upstream.py", "--listen",
        "127.0.0.1:" .. port, "--name", opts.name or "up" }
    if opts.listen_after_ms then
        cmd[#cmd + 1] = "--listen-after-ms"
        cmd[#cmd + 1] = tostring(opts.listen_after_ms)
    end
    local p = assert(process.spawn{ cmd = cmd, stdout = dir .. "/stdout.log",
        stderr = dir .. "/stderr.log" })
    local up = { port = port, proc = p, name = opts.name or "up" }
    if opts.wait ~= false and not opts.listen_after_ms then
        assert(net.wait_port("127.0.0.1", port, 30, p))
    end
    function up.stats()
        local r = assert(http.request{ port = port, path = "/__stats" })
        return cjson.decode(r.body)
    end
    return up
end

-- A spec that needs an external tool calls this first. When the tool is missing: in CI (the
-- CI environment variable set, as .ci/run's environment has it) the spec fails, since a check
-- the README promises must not pass without running; elsewhere it says so loudly on stderr and
-- returns false and a message for the spec's pending() (busted's pending is not visible here):
--   local ok, why = H.need_tool("valgrind"); if not ok then pending(why) return end
function M.need_tool(name, why)
    if os.execute("command -v " .. name .. " >/dev/null 2>&1") == 0 then
        return true
    end
    local msg = ("%s is not installed (%s)"):format(name, why or "needed by this spec")
    if os.getenv("CI") and os.getenv("CI") ~= "" and os.getenv("CI") ~= "false" then
        error(msg .. ": in CI every tool the suite uses must be installed (.ci/packages)", 2)
    end
    io.stderr:write("\n*** SKIPPED: " .. msg .. ": this check did NOT run ***\n")
    return false, "SKIPPED: " .. msg
end

-- Problems a sanitizer build reports on stderr (memory errors, leaks, undefined behaviour).
function M.sanitizer_report(text)
    return text:match("ERROR: AddressSanitizer[^\n]*") or text:match("ERROR: LeakSanitizer[^\n]*")
        or text:match("runtime error:[^\n]*")
end

-- Stops every proxy (SIGTERM: a graceful drain must end with exit code 0 and a clean
-- sanitizer report), then every other process, then removes the temporary directories.
-- Raises if a proxy did not exit cleanly, or had already exited although the spec never
-- signalled or stopped it (a crash), so a teardown fails the spec file.
function M.stop_all()
    local problems = {}
    for _, px in ipairs(proxies) do
        local was_alive = px.proc:alive()
        local signalled = px.proc.signalled
        local code, how = px.proc:stop(15)
        local report = M.sanitizer_report(px:stderr())
        if report then
            problems[#problems + 1] = "proxy " .. px.port .. ": " .. report
        elseif not was_alive and not signalled then
            problems[#problems + 1] = ("proxy %d died during the spec (%s %s); stderr tail:\n%s")
                :format(px.port, tostring(how), tostring(code), (px:stderr()):sub(-2000))
        elseif was_alive and not (how == "exited" and code == 0) then
            problems[#problems + 1] = ("proxy %d: SIGTERM ended it with %s %s"):format(px.port,
                tostring(how), tostring(code))
        end
    end
    proxies = {}
    process.stop_all(5)
    if #problems > 0 then
        -- keep the directories for a post-mortem
        tmpdirs = {}
        error(table.concat(problems, "\n"), 2)
    end
    for _, d in ipairs(tmpdirs) do
        process.rm_rf(d)
    end
    tmpdirs = {}
end

M.http = http
M.net = net
M.process = process
M.cjson = cjson

return M
