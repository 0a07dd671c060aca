-- The command line: --help documents every option and knob, --version, unknown options and
-- bad values are one-line errors with exit code 2, PORT is honoured, --check, and the embedded
-- demo default (no source given) serves /health and a round trip to the demo sandbox.
local H = require "spec.helpers.proxy"
local process = require "spec.helpers.process"
local cjson = require "cjson"

local function run(args, env)
    local dir = H.tmpdir()
    local cmd = { H.BIN }
    for _, a in ipairs(args) do
        cmd[#cmd + 1] = a
    end
    local p = assert(process.spawn{ cmd = cmd, env = env, stdout = dir .. "/out", stderr = dir .. "/err" })
    local code = p:wait(20)
    return code, p:read_stdout(), p:read_stderr()
end

describe("the command line", function()
    teardown(function()
        H.stop_all()
    end)

    it("--help documents every option and knob", function()
        local code, out = run({ "--help" })
        assert.are.equal(0, code)
        for _, opt in ipairs({ "--listen", "--scripts", "--config", "--sandboxes-file", "--check",
            "--version", "--workers", "--set", "--log-level", "--demo" }) do
            assert.is_truthy(out:find(opt, 1, true), opt .. " is not documented")
        end
        for _, knob in ipairs({ "max_url_size", "max_header_size", "max_headers", "header_timeout",
            "keepalive_timeout", "body_timeout", "max_connections", "connect_timeout",
            "first_byte_timeout", "upstream_keepalive", "connect_retries", "drain_timeout" }) do
            assert.is_truthy(out:find(knob, 1, true), knob .. " is not documented")
        end
    end)

    -- The README's table of defaults that can refuse a request, and --help, say the same: every
    -- row is in --help, a knob's default is the knob table's, the rate limits are the script's.
    it("--help lists every default that can refuse a request, as the README's table does", function()
        local code, out = run({ "--help" })
        assert.are.equal(0, code)
        local readme = assert(process.read_file(H.SOURCE_DIR .. "/README.md"))
        local section = assert(readme:match("\n## Defaults that can refuse a request\n(.-)\n## "),
            "README has no 'Defaults that can refuse a request' section")
        local rows = {}
        for line in section:gmatch("[^\n]+") do
            local name, default = line:match("^| `([%w_%.]+)`[^|]*| ([^|]+) |")
            if name then
                rows[name] = default
            end
        end
        -- every knob that can refuse or cut off a request has a row
        for _, knob in ipairs({ "max_connections", "max_connections_per_ip", "max_tunnels",
            "max_url_size", "max_header_size", "max_headers", "max_chunk_extension_size",
            "max_body_size", "header_timeout", "body_timeout", "send_timeout", "keepalive_timeout",
            "keepalive_requests", "max_upstream_header_size", "connect_timeout",
            "first_byte_timeout", "upstream_idle_timeout", "tunnel_idle_timeout",
            "script_time_budget", "lua_memory_limit_mb", "drain_timeout", "h2_stream_idle_timeout" }) do
            assert.is_truthy(rows[knob], knob .. " has no row in the README table")
        end
        for _, name in ipairs({ "ratelimit.limits", "ratelimit.trusted_proxies",
            "ratelimit.concurrency.per_sandbox", "auth", "wake.max_wait",
            "wake.max_held_per_sandbox", "wake.max_held" }) do
            assert.is_truthy(rows[name], name .. " has no row in the README table")
        end
        for name, default in pairs(rows) do
            local help_line = out:match("\n  " .. name:gsub("%.", "%%.") .. " [^\n]*")
            assert.is_truthy(help_line, name .. " is in the README table but not in --help")
            local knob_default = help_line:match("%(default: ([^)]+)%)$")
            if knob_default then
                -- a knob: the README states the knob table's default
                assert.are.equal(knob_default, default:match("^(%S+)"), name)
            else
                -- a script default: its first number is in --help's line(s) for it
                local n = default:match("%f[%w](%d+)%f[%W]")
                if n then
                    local block = out:match("\n  " .. name:gsub("%.", "%%.") .. " .-\n  %S")
                    assert.is_truthy(block and block:find(n, 1, true),
                        name .. ": --help does not say " .. n)
                end
            end
        end
        -- the default rate limits in --help and the README are ratelimit.lua's own
        local script = assert(process.read_file(H.SOURCE_DIR .. "/scripts/ratelimit.lua"))
        local defaults = assert(script:match("M%.DEFAULT_LIMITS = (%b{})"))
        local n = 0
        for name, key, rate, burst in defaults:gmatch(
            'name = "(%w+)", key = "(%w+)", rate = (%d+), burst = (%d+)') do
            n = n + 1
            assert.is_truthy(out:find(name .. "%s+key " .. key .. "%s+" .. rate .. "/s, burst " .. burst),
                "--help does not state the default limit " .. name)
            assert.is_truthy(section:find("`" .. name .. "` (key `" .. key .. "`) | " .. rate
                .. "/s, burst " .. burst, 1, true), "the README does not state the default limit " .. name)
        end
        assert.are.equal(2, n)
        local per_sandbox = assert(script:match("M%.DEFAULT_PER_SANDBOX = (%d+)"))
        assert.matches("per_sandbox%s+503 beyond " .. per_sandbox, out)
        -- where the knobs end, the script section begins
        assert.is_truthy(out:find("Script defaults that can refuse a request", 1, true))
    end)

    it("--version prints the version", function()
        local code, out = run({ "--version" })
        assert.are.equal(0, code)
        assert.matches("^sandbox%-proxy %d+%.%d+%.%d+", out)
    end)

    local bad = {
        { { "--bogus" }, "unknown option '%-%-bogus'" },
        { { "--workers", "many" }, "workers: expected a number" },
        { { "--workers", "-1" }, "workers: %-1 is out of range" },
        { { "--listen", "nowhere" }, "expected ADDR:PORT" },
        { { "--listen", "127.0.0.1:99999" }, "bad port" },
        { { "--set", "no_such_knob=1" }, "unknown setting 'no_such_knob'" },
        { { "--set", "header_timeout=soon" }, "header_timeout: expected a number" },
        { { "--scripts", "/nonexistent/dir" }, "is not a directory" },
        { { "--config" }, "needs a value" },
        { { "--log-level", "loud" }, "log_level" },
    }
    for _, case in ipairs(bad) do
        it("rejects " .. table.concat(case[1], " ") .. " with exit code 2", function()
            local code, _, err = run(case[1])
            assert.are.equal(2, code)
            assert.matches(case[2], err)
            local lines = select(2, err:gsub("\n", ""))
            assert.are.equal(1, lines, "expected one line, got: " .. err)
        end)
    end

    it("--check passes on the built-in scripts and a good file", function()
        local code, out = run({ "--check", "--sandboxes-file",
            H.SOURCE_DIR .. "/scripts/demo/sandboxes.json" })
        assert.are.equal(0, code)
        assert.matches("OK", out)
    end)

    it("--check reports a broken sandboxes file", function()
        local dir = H.tmpdir()
        assert(process.write_file(dir .. "/bad.json", "{nope"))
        local code, _, err = run({ "--check", "--sandboxes-file", dir .. "/bad.json" })
        assert.are.equal(1, code)
        assert.matches("invalid JSON", err)
    end)

    it("--check reports a bad config file", function()
        local dir = H.tmpdir()
        assert(process.write_file(dir .. "/c.lua", "return { header_timeout = 'x' }"))
        local code, _, err = run({ "--check", "--config", dir .. "/c.lua" })
        assert.are.equal(1, code)
        assert.matches("header_timeout", err)
    end)

    it("--check reports untrusted credentials (an empty HS256 secret file)", function()
        local dir = H.tmpdir()
        assert(process.write_file(dir .. "/hs.secret", "\n"))
        assert(process.write_file(dir .. "/c.lua", ("return { auth = { jwt = { "
            .. "hs256_secret_file = %q } } }"):format(dir .. "/hs.secret")))
        local code, out, err = run({ "--check", "--config", dir .. "/c.lua", "--sandboxes-file",
            H.SOURCE_DIR .. "/scripts/demo/sandboxes.json" })
        assert.are.equal(1, code, out .. err)
        assert.matches("the HS256 secret is 0 bytes, at least 32 are required", err, 1, true)
    end)

    it("takes knobs from a config file, with the command line winning", function()
        local dir = H.tmpdir()
        assert(process.write_file(dir .. "/c.lua",
            "return { max_url_size = 100, router = { retry_after = 7 } }"))
        local up = H.upstream{}
        local px = H.start{ config = process.read_file(dir .. "/c.lua"),
            sandboxes = { H.sandbox("a", "b", up.port, { ready = false }) },
            set = { max_url_size = 200 } }
        local r = assert(px:get("/a/b/" .. string.rep("x", 150)))
        assert.are.equal(503, r.status) -- 150 < 200: the command line won over the file's 100
        assert.are.equal("7", r.headers["retry-after"]) -- the script section was read
        r = assert(px:get("/a/b/" .. string.rep("x", 250)))
        assert.are.equal(414, r.status)
    end)

    it("honours PORT when --listen is not given", function()
        local port = assert(H.net.free_port())
        local dir = H.tmpdir()
        local p = assert(process.spawn{ cmd = { H.BIN, "--workers", "1", "--sandboxes-file",
            H.SOURCE_DIR .. "/scripts/demo/sandboxes.json" },
            env = { PORT = tostring(port), KUBERNETES_SERVICE_HOST = false, KUBECONFIG = false },
            stderr = dir .. "/err" })
        H.net.wait_until(function()
            local r = H.http.request{ port = port, path = "/health", timeout = 1 }
            return r and r.status == 200
        end, 10)
        p:stop()
    end)

    it("finds its built-in scripts from an installed tree too", function()
        local prefix = H.tmpdir()
        local build = H.BIN:match("^(.*)/[^/]+$")
        assert(os.execute("cmake --install " .. build .. " --prefix " .. prefix .. " >/dev/null") == 0)
        local code, out = run({ "--check", "--demo" })
        assert.are.equal(0, code, out)
        local p = assert(process.spawn{ cmd = { prefix .. "/bin/sandbox-proxy", "--check", "--demo" },
            stdout = prefix .. "/out", stderr = prefix .. "/err" })
        assert.are.equal(0, p:wait(20), p:read_stderr())
        assert.matches("OK", p:read_stdout())
    end)

    it("runs a team's specs against its override scripts (sandbox-proxy test --scripts)", function()
        local dir = H.tmpdir()
        assert(os.execute("mkdir -p " .. dir .. "/scripts " .. dir .. "/specs") == 0)
        assert(process.write_file(dir .. "/scripts/router.lua", [[
local M = {}
function M.handle(req)
    if req:header("x-team") ~= "blue" then
        return req:respond(403, { error = "team only" })
    end
    req:forward("10.0.0.9", 8888, req:target())
end
return M
]]))
        assert(process.write_file(dir .. "/specs/router_spec.lua", [[
local testkit = require "sp.testkit"
local router = require "router"
describe("team router", function()
    it("refuses strangers", function()
        local req = testkit.request{ target = "/a/b/x" }
        router.handle(req)
        assert.are.equal(403, req.response.status)
    end)
    it("forwards the team", function()
        local req = testkit.request{ target = "/a/b/x", headers = { ["X-Team"] = "blue" } }
        router.handle(req)
        assert.are.equal("10.0.0.9", req.forwarded.host)
    end)
end)
]]))
        local code, out = run({ "test", "--scripts", dir .. "/scripts", dir .. "/specs" })
        assert.are.equal(0, code, out)
        assert.matches("2 successes / 0 failures", out)
        -- and a failing spec fails the command
        assert(process.write_file(dir .. "/specs/bad_spec.lua", [[
describe("x", function() it("fails", function() assert.are.equal(1, 2) end) end)
]]))
        code = run({ "test", "--scripts", dir .. "/scripts", dir .. "/specs" })
        assert.are_not.equal(0, code)
    end)

    it("runs the embedded demo with no source: /health and a demo round trip", function()
        local port = assert(H.net.free_port())
        local demo = assert(H.net.free_port())
        local dir = H.tmpdir()
        local p = assert(process.spawn{ cmd = { H.BIN, "--listen", "127.0.0.1:" .. port,
            "--workers", "1", "--set", "demo_listen=127.0.0.1:" .. demo },
            env = { KUBERNETES_SERVICE_HOST = false, KUBECONFIG = false },
            stderr = dir .. "/err", stdout = dir .. "/out" })
        H.net.wait_until(function()
            local r = H.http.request{ port = port, path = "/health", timeout = 1 }
            return r and r.status == 200
        end, 10)
        local r = assert(H.http.request{ port = port, path = "/demo/hello/" })
        assert.are.equal(200, r.status)
        assert.are.equal("Sandbox Runtime is active.", cjson.decode(r.body).message)
        r = assert(H.http.request{ port = port, method = "POST", path = "/demo/hello/execute",
            body = '{"command":"rm -rf /"}' })
        assert.are.equal(200, r.status)
        local e = cjson.decode(r.body)
        assert.are.equal(0, e.exit_code)
        assert.matches("not executed", e.stdout)
        assert.matches("demo mode", p:read_stderr())
        p:stop()
    end)
end)
