-- sandbox_headers.lua: the agent-sandbox router's header contract built into the default chain
-- (X-Sandbox-ID, -Namespace, -Port, -Timeout, -Pod-IP), /healthz, the {"detail": ...} errors,
-- the namespace/name index over the real shared route table (sp.routes), and router.lua's use
-- of it (headers win; no X-Sandbox-ID: path routing).
local testkit = require "sp.testkit"
local routes = require "sp.routes"

local MODULE = "sandbox_headers"

-- A fresh instance of the router with config section `section` (nil: defaults).
local function load(section)
    return testkit.load(MODULE, "sandbox_headers", section)
end

-- Runs one request through router.handle. headers: a map; opts: method, target.
local function send(router, headers, opts)
    opts = opts or {}
    local req = testkit.request{ method = opts.method or "GET", target = opts.target or "/execute",
        headers = headers or {} }
    router.handle(req)
    return req
end

local function lower_set(list)
    local s = {}
    for _, n in ipairs(list or {}) do
        s[n:lower()] = true
    end
    return s
end

local ROUTES = {
    ["default/sb"] = { address = "10.0.0.7", port = 8888 },
    ["alice/py"] = { address = "10.0.0.8", port = 9000, namespace = "team-a" },
    ["default/sleepy"] = { address = "10.0.0.9", ready = false, reason = "SandboxSuspended" },
    ["default/noaddr"] = { port = 8888 },
}

describe("sandbox_headers", function()
    local router

    before_each(function()
        testkit.set_routes(ROUTES)
        router = load()
    end)

    after_each(function()
        testkit.clear_routes()
    end)

    describe("is_dns_label", function()
        it("accepts DNS-1123 labels", function()
            for _, s in ipairs({ "a", "0", "sb", "sb-1", "python-pool-x7k2p", "a--b", "1a",
                string.rep("a", 63) }) do
                assert.is_true(router.is_dns_label(s), s)
            end
        end)

        it("rejects anything else", function()
            for _, s in ipairs({ "", "A", "Sb", "sB", string.rep("a", 64), "-a", "a-", "-",
                "a_b", "a.b", "a b", "a/b", "..", " a", "a\0", "\195\164" }) do
                assert.is_false(router.is_dns_label(s), s)
            end
        end)
    end)

    describe("/healthz", function()
        it("answers 200 {\"status\":\"ok\"} to GET and HEAD", function()
            for _, m in ipairs({ "GET", "HEAD" }) do
                local req = testkit.request{ method = m, target = "/healthz" }
                router.healthz(req)
                assert.are.equal(200, req.response.status)
                assert.are.same({ status = "ok" }, req.response.json)
            end
        end)

        it("answers 405 to other methods", function()
            local req = testkit.request{ method = "POST", target = "/healthz" }
            router.healthz(req)
            assert.are.equal(405, req.response.status)
            assert.are.equal("GET, HEAD", req.response.headers.Allow)
        end)
    end)

    describe("X-Sandbox-ID", function()
        it("routes to the sandbox of that name in namespace default", function()
            local req = send(router, { ["X-Sandbox-ID"] = "sb" })
            assert.is_nil(req.response)
            assert.are.equal("10.0.0.7", req.forwarded.host)
            assert.are.equal(8888, req.forwarded.port)
            assert.are.equal("/execute", req.forwarded.path)
            assert.are.equal("default/sb", req.ctx.route.key)
        end)

        it("without it, handle decides nothing and returns false (path routing)", function()
            local req = testkit.request{ target = "/alice/py/x",
                headers = { ["X-Sandbox-Namespace"] = "team-a", ["X-Sandbox-Port"] = "1" } }
            assert.is_false(router.handle(req))
            assert.are.equal("none", req:decision())
        end)

        it("is ignored altogether with enabled = false", function()
            local r = load{ enabled = false }
            local req = testkit.request{ target = "/execute", headers = { ["X-Sandbox-ID"] = "sb" } }
            assert.is_false(r.handle(req))
            assert.are.equal("none", req:decision())
        end)

        it("counts an empty value as missing", function()
            local req = send(router, { ["X-Sandbox-ID"] = "" })
            assert.are.equal(400, req.response.status)
            assert.are.same({ detail = "X-Sandbox-ID header is required." }, req.response.json)
        end)

        it("must be a DNS-1123 label", function()
            for _, id in ipairs({ "SB", "Sb", string.rep("a", 64), "-sb", "sb-", "s_b", "s.b",
                "s/b", "../sb", "sb%2F", " sb" }) do
                local req = send(router, { ["X-Sandbox-ID"] = id })
                assert.are.equal(400, req.response.status, id)
                assert.are.same({ detail = "Invalid sandbox ID format." }, req.response.json, id)
                assert.is_nil(req.forwarded, id)
            end
        end)

        it("accepts a 63-character name", function()
            local name = string.rep("b", 63)
            testkit.set_routes{ ["default/" .. name] = { address = "10.0.0.1" } }
            local req = send(router, { ["X-Sandbox-ID"] = name })
            assert.are.equal("10.0.0.1", req.forwarded.host)
        end)

        it("reads the header case-insensitively", function()
            local req = send(router, { ["x-sandbox-id"] = "sb" })
            assert.are.equal("10.0.0.7", req.forwarded.host)
        end)
    end)

    describe("X-Sandbox-Namespace", function()
        it("selects the namespace (the route key's user plays no part)", function()
            local req = send(router, { ["X-Sandbox-ID"] = "py", ["X-Sandbox-Namespace"] = "team-a" })
            assert.are.equal("10.0.0.8", req.forwarded.host)
            assert.are.equal("alice/py", req.ctx.route.key)
        end)

        it("defaults to default", function()
            local req = send(router, { ["X-Sandbox-ID"] = "py" })
            assert.are.equal(404, req.response.status)
            assert.are.same({ detail = "Sandbox 'py' not found in namespace 'default'." },
                req.response.json)
        end)

        it("must name the sandbox's own namespace", function()
            local req = send(router, { ["X-Sandbox-ID"] = "sb", ["X-Sandbox-Namespace"] = "team-a" })
            assert.are.equal(404, req.response.status)
            assert.are.same({ detail = "Sandbox 'sb' not found in namespace 'team-a'." },
                req.response.json)
        end)

        it("must be a DNS-1123 label", function()
            for _, ns in ipairs({ "", "Team-a", "TEAM", string.rep("n", 64), "-team", "team-",
                "team.a", "team_a", "team/a" }) do
                local req = send(router, { ["X-Sandbox-ID"] = "sb", ["X-Sandbox-Namespace"] = ns })
                assert.are.equal(400, req.response.status, ns)
                assert.are.same({ detail = "Invalid namespace format." }, req.response.json, ns)
            end
        end)

        it("accepts a 63-character namespace", function()
            local ns = string.rep("n", 63)
            testkit.set_routes{ ["default/sb"] = { address = "10.0.0.2", namespace = ns } }
            local req = send(router, { ["X-Sandbox-ID"] = "sb", ["X-Sandbox-Namespace"] = ns })
            assert.are.equal("10.0.0.2", req.forwarded.host)
        end)
    end)

    describe("X-Sandbox-Port", function()
        it("defaults to 8888, not the route's port", function()
            local req = send(router, { ["X-Sandbox-ID"] = "py", ["X-Sandbox-Namespace"] = "team-a" })
            assert.are.equal(8888, req.forwarded.port)
        end)

        it("names the port on the sandbox's address", function()
            for _, p in ipairs({ "1", "80", "9000", "65535", "08080", "+80", " 80", "80 " }) do
                local req = send(router, { ["X-Sandbox-ID"] = "sb", ["X-Sandbox-Port"] = p })
                assert.are.equal(tonumber(p), req.forwarded.port, p)
                assert.are.equal("10.0.0.7", req.forwarded.host, p)
            end
        end)

        it("must be an integer from 1 to 65535", function()
            for _, p in ipairs({ "", "0", "00000", "65536", "99999", "100000", "-1", "80.0",
                "8e3", "0x50", "abc", "++80", "8 0", "80,81" }) do
                local req = send(router, { ["X-Sandbox-ID"] = "sb", ["X-Sandbox-Port"] = p })
                assert.are.equal(400, req.response.status, "'" .. p .. "'")
                assert.are.same({ detail = "Invalid port format." }, req.response.json, p)
            end
        end)

        it("default_port is configurable", function()
            local r = load{ default_port = 7000 }
            local req = send(r, { ["X-Sandbox-ID"] = "sb" })
            assert.are.equal(7000, req.forwarded.port)
            req = send(r, { ["X-Sandbox-ID"] = "sb", ["X-Sandbox-Port"] = "81" })
            assert.are.equal(81, req.forwarded.port)
        end)

        it("default_port = \"route\" takes the route's port", function()
            local r = load{ default_port = "route" }
            local req = send(r, { ["X-Sandbox-ID"] = "py", ["X-Sandbox-Namespace"] = "team-a" })
            assert.are.equal(9000, req.forwarded.port)
        end)

        it("allowed_ports limits the ports a client may name (403)", function()
            local r = load{ allowed_ports = { 8888, 9000 } }
            local req = send(r, { ["X-Sandbox-ID"] = "sb", ["X-Sandbox-Port"] = "22" })
            assert.are.equal(403, req.response.status)
            assert.are.same({ detail = "Port 22 is not allowed." }, req.response.json)
            req = send(r, { ["X-Sandbox-ID"] = "sb", ["X-Sandbox-Port"] = "9000" })
            assert.are.equal(9000, req.forwarded.port)
        end)

        it("rejects bad configuration at load", function()
            for _, p in ipairs({ 0, 65536, 80.5, "8888", "x" }) do
                assert.has_error(function() load{ default_port = p } end)
                assert.has_error(function() load{ allowed_ports = { p } } end)
            end
            assert.has_error(function() load{ allowed_ports = 8888 } end)
        end)
    end)

    describe("X-Sandbox-Timeout", function()
        local function timeouts(r, value)
            local req = send(r, { ["X-Sandbox-ID"] = "sb", ["X-Sandbox-Timeout"] = value })
            assert.is_table(req.forwarded, tostring(value))
            return req.forwarded.timeouts
        end

        it("sets the first-byte and idle timeouts", function()
            assert.are.same({ first_byte = 30, idle = 30 }, timeouts(router, "30"))
            assert.are.same({ first_byte = 0.5, idle = 0.5 }, timeouts(router, "0.5"))
            assert.are.same({ first_byte = 2.5, idle = 2.5 }, timeouts(router, "2.5"))
            assert.are.same({ first_byte = 180, idle = 180 }, timeouts(router, "180"))
        end)

        it("is capped at max_timeout (default 180)", function()
            assert.are.same({ first_byte = 180, idle = 180 }, timeouts(router, "181"))
            assert.are.same({ first_byte = 180, idle = 180 }, timeouts(router, "86400"))
            assert.are.same({ first_byte = 180, idle = 180 }, timeouts(router, "1e3"))
        end)

        it("max_timeout is configurable", function()
            local r = load{ max_timeout = 900 }
            assert.are.same({ first_byte = 600, idle = 600 }, timeouts(r, "600"))
            assert.are.same({ first_byte = 900, idle = 900 }, timeouts(r, "3600"))
            r = load{ max_timeout = 10 }
            assert.are.same({ first_byte = 10, idle = 10 }, timeouts(r, "30"))
        end)

        it("leaves the timeouts alone without the header", function()
            local req = send(router, { ["X-Sandbox-ID"] = "sb" })
            assert.are.same({}, req.forwarded.timeouts)
        end)

        it("reads what the SDK writes (str() of a Python int or float)", function()
            assert.are.same({ first_byte = 60, idle = 60 }, timeouts(router, "60"))
            assert.are.same({ first_byte = 60, idle = 60 }, timeouts(router, "60.0"))
            assert.are.same({ first_byte = 1e-05, idle = 1e-05 }, timeouts(router, "1e-05"))
            assert.are.same({ first_byte = 5, idle = 5 }, timeouts(router, " 5"))
        end)

        it("ignores a value that is not a finite positive number", function()
            for _, v in ipairs({ "", "0", "0.0", "-5", "abc", "inf", "nan", "0x10", "5s",
                "1.2.3", ".", "1e", "e5", "5-", "1e999" }) do
                assert.are.same({}, timeouts(router, v), "'" .. v .. "'")
            end
        end)

        it("rejects a bad max_timeout at load", function()
            for _, v in ipairs({ 0, -1, "180", math.huge }) do
                assert.has_error(function() load{ max_timeout = v } end)
            end
        end)
    end)

    describe("X-Sandbox-Pod-IP", function()
        it("never chooses the address: a different IP is ignored and noted", function()
            for _, v in ipairs({ "169.254.169.254", "127.0.0.1", "10.9.9.9", "::1" }) do
                local req = send(router, { ["X-Sandbox-ID"] = "sb", ["X-Sandbox-Pod-IP"] = v })
                assert.are.equal("10.0.0.7", req.forwarded.host, v)
                assert.is_true(req.ctx.pod_ip_mismatch, v)
            end
        end)

        it("matching the sandbox's own pod IP changes nothing", function()
            local req = send(router, { ["X-Sandbox-ID"] = "sb", ["X-Sandbox-Pod-IP"] = "10.0.0.7" })
            assert.are.equal("10.0.0.7", req.forwarded.host)
            assert.is_nil(req.ctx.pod_ip_mismatch)
        end)

        it("400 for a value that is not an IP address", function()
            for _, v in ipairs({ "evil.example", "10.0.0", "10.0.0.7:80", "http://10.0.0.7" }) do
                local req = send(router, { ["X-Sandbox-ID"] = "sb", ["X-Sandbox-Pod-IP"] = v })
                assert.are.equal(400, req.response.status, v)
                assert.are.same({ detail = "Invalid target IP address format." }, req.response.json)
                assert.is_nil(req.forwarded, v)
            end
        end)

        it("cannot reach an unknown sandbox", function()
            local req = send(router, { ["X-Sandbox-ID"] = "ghost", ["X-Sandbox-Pod-IP"] = "10.0.0.7" })
            assert.are.equal(404, req.response.status)
            assert.is_nil(req.forwarded)
        end)

        it("cannot bring a not-ready sandbox online", function()
            local req = send(router, { ["X-Sandbox-ID"] = "sleepy", ["X-Sandbox-Pod-IP"] = "10.0.0.9" })
            assert.are.equal(503, req.response.status)
        end)
    end)

    describe("the upstream request", function()
        it("has the X-Sandbox-* headers removed and keeps the others", function()
            local req = send(router, {
                ["X-Sandbox-ID"] = "sb", ["X-Sandbox-Namespace"] = "default",
                ["X-Sandbox-Port"] = "8888", ["X-Sandbox-Timeout"] = "5",
                ["X-Sandbox-Pod-IP"] = "10.9.9.9", ["Authorization"] = "Bearer app-token",
                ["X-Sandbox-UID"] = "1234", ["X-Sandbox-Anything"] = "x", ["X-Other"] = "1",
                ["X-Sandboxed"] = "kept",
            })
            assert.are.same({ ["x-sandbox-id"] = true, ["x-sandbox-namespace"] = true,
                ["x-sandbox-port"] = true, ["x-sandbox-timeout"] = true,
                ["x-sandbox-pod-ip"] = true, ["x-sandbox-uid"] = true,
                ["x-sandbox-anything"] = true }, lower_set(req.forwarded.removed_headers))
            assert.are.same({}, req.forwarded.set_headers)
        end)

        it("asks the runtime for {\"detail\": ...} upstream error bodies naming the sandbox", function()
            local req = send(router, { ["X-Sandbox-ID"] = "sb" })
            assert.are.equal("sb", req.error_detail)
        end)

        it("only removes the routing headers that were sent", function()
            local req = send(router, { ["X-Sandbox-ID"] = "sb" })
            assert.are.same({ ["x-sandbox-id"] = true }, lower_set(req.forwarded.removed_headers))
        end)

        it("keeps the whole target, escapes and query exactly as received", function()
            for _, t in ipairs({ "/", "/execute", "/execute?x=1&y=%2F", "/download/%2Ftmp%2Fa%20b",
                "/list//tmp/", "/a/b/c?", "/?q=/x/y" }) do
                local req = send(router, { ["X-Sandbox-ID"] = "sb" }, { method = "POST", target = t })
                assert.are.equal(t, req.forwarded.path)
            end
        end)

        it("carries any method", function()
            for _, m in ipairs({ "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS" }) do
                local req = send(router, { ["X-Sandbox-ID"] = "sb" }, { method = m })
                assert.are.equal("10.0.0.7", req.forwarded.host, m)
            end
        end)
    end)

    describe("sandbox state", function()
        it("404 for an unknown sandbox, with detail", function()
            local req = send(router, { ["X-Sandbox-ID"] = "ghost" })
            assert.are.equal(404, req.response.status)
            assert.are.same({ detail = "Sandbox 'ghost' not found in namespace 'default'." },
                req.response.json)
            assert.are.equal("application/json", req.response.headers["Content-Type"])
        end)

        it("503 with Retry-After for a sandbox that is not ready", function()
            local req = send(router, { ["X-Sandbox-ID"] = "sleepy" })
            assert.are.equal(503, req.response.status)
            assert.are.same({ detail = "Sandbox 'sleepy' is not ready (SandboxSuspended)." },
                req.response.json)
            assert.are.equal("2", req.response.headers["Retry-After"])
        end)

        it("503 with Retry-After for a ready sandbox without an address", function()
            local req = send(router, { ["X-Sandbox-ID"] = "noaddr" })
            assert.are.equal(503, req.response.status)
            assert.are.same({ detail = "Sandbox 'noaddr' has no address yet." }, req.response.json)
            assert.are.equal("2", req.response.headers["Retry-After"])
        end)

        it("retry_after is configurable", function()
            local r = load{ retry_after = 7 }
            local req = send(r, { ["X-Sandbox-ID"] = "sleepy" })
            assert.are.equal("7", req.response.headers["Retry-After"])
        end)
    end)

    describe("the namespace/name index", function()
        it("finds a sandbox whose key has another user, and builds the index once", function()
            local r = load{ guess_users = {} }
            local req = send(r, { ["X-Sandbox-ID"] = "py", ["X-Sandbox-Namespace"] = "team-a" })
            assert.are.equal("10.0.0.8", req.forwarded.host)
            assert.are.equal(1, r.index_stats().rebuilds)
            assert.are.equal(4, r.index_stats().size)
            for _ = 1, 5 do
                req = send(r, { ["X-Sandbox-ID"] = "py", ["X-Sandbox-Namespace"] = "team-a" })
                assert.are.equal("10.0.0.8", req.forwarded.host)
            end
            assert.are.equal(1, r.index_stats().rebuilds)
        end)

        it("does not rebuild for misses while the route table is unchanged", function()
            local r = load{ guess_users = {} }
            for i = 1, 20 do
                local req = send(r, { ["X-Sandbox-ID"] = "ghost" .. i })
                assert.are.equal(404, req.response.status)
            end
            assert.are.equal(1, r.index_stats().rebuilds)
        end)

        it("sees routes added, moved and deleted after it was built", function()
            local r = load{ guess_users = {}, index_min_interval = 0,
                index_cost_factor = 0 }
            assert.are.equal(404, send(r, { ["X-Sandbox-ID"] = "new" }).response.status)
            -- added under a user key
            routes.set("bob/new", { namespace = "default", name = "new", user = "bob",
                address = "10.1.0.1", port = 8888, ready = true })
            local req = send(r, { ["X-Sandbox-ID"] = "new" })
            assert.are.equal("10.1.0.1", req.forwarded.host)
            assert.are.equal("bob/new", req.ctx.route.key)
            -- moved to another key (its user label changed)
            routes.delete("bob/new")
            routes.set("carol/new", { namespace = "default", name = "new", user = "carol",
                address = "10.1.0.2", port = 8888, ready = true })
            req = send(r, { ["X-Sandbox-ID"] = "new" })
            assert.are.equal("10.1.0.2", req.forwarded.host)
            assert.are.equal("carol/new", req.ctx.route.key)
            -- address changed in place: served from the live route, not a cached copy
            routes.set("carol/new", { namespace = "default", name = "new", user = "carol",
                address = "10.1.0.3", port = 8888, ready = true })
            req = send(r, { ["X-Sandbox-ID"] = "new" })
            assert.are.equal("10.1.0.3", req.forwarded.host)
            -- deleted
            routes.delete("carol/new")
            assert.are.equal(404, send(r, { ["X-Sandbox-ID"] = "new" }).response.status)
        end)

        it("does not serve a stale entry whose route changed namespace", function()
            local r = load{ guess_users = {}, index_min_interval = 0,
                index_cost_factor = 0 }
            local req = send(r, { ["X-Sandbox-ID"] = "py", ["X-Sandbox-Namespace"] = "team-a" })
            assert.are.equal("10.0.0.8", req.forwarded.host)
            routes.set("alice/py", { namespace = "team-b", name = "py", user = "alice",
                address = "10.0.0.8", port = 9000, ready = true })
            req = send(r, { ["X-Sandbox-ID"] = "py", ["X-Sandbox-Namespace"] = "team-a" })
            assert.are.equal(404, req.response.status)
            req = send(r, { ["X-Sandbox-ID"] = "py", ["X-Sandbox-Namespace"] = "team-b" })
            assert.are.equal("10.0.0.8", req.forwarded.host)
        end)

        it("keeps same-named sandboxes of different namespaces apart", function()
            testkit.set_routes{
                ["alice/sb"] = { address = "10.2.0.1", namespace = "ns-a" },
                ["bob/sb"] = { address = "10.2.0.2", namespace = "ns-b" },
            }
            local r = load()
            assert.are.equal("10.2.0.1",
                send(r, { ["X-Sandbox-ID"] = "sb", ["X-Sandbox-Namespace"] = "ns-a" }).forwarded.host)
            assert.are.equal("10.2.0.2",
                send(r, { ["X-Sandbox-ID"] = "sb", ["X-Sandbox-Namespace"] = "ns-b" }).forwarded.host)
            assert.are.equal(404, send(r, { ["X-Sandbox-ID"] = "sb" }).response.status)
        end)

        it("finds default-user sandboxes by guess, without building the index", function()
            local r = load()
            local req = send(r, { ["X-Sandbox-ID"] = "sb" })
            assert.are.equal("10.0.0.7", req.forwarded.host)
            assert.are.equal(0, r.index_stats().rebuilds)
            assert.are.equal(1, r.index_stats().guesses)
        end)

        it("uses the configured guess users", function()
            local r = load{ guess_users = { "alice" } }
            local req = send(r, { ["X-Sandbox-ID"] = "py", ["X-Sandbox-Namespace"] = "team-a" })
            assert.are.equal("10.0.0.8", req.forwarded.host)
            assert.are.equal(0, r.index_stats().rebuilds)
        end)

        it("rebuilds at most once per index_min_interval; a miss inside it is a 503, not a 404",
            function()
                local r = load{ guess_users = {}, index_min_interval = 3600 }
                assert.are.equal(404, send(r, { ["X-Sandbox-ID"] = "late" }).response.status)
                assert.are.equal(1, r.index_stats().rebuilds)
                routes.set("dave/late", { namespace = "default", name = "late", user = "dave",
                    address = "10.3.0.1", port = 8888, ready = true })
                local req = send(r, { ["X-Sandbox-ID"] = "late" })
                assert.are.equal(503, req.response.status)
                assert.are.equal("1", req.response.headers["Retry-After"])
                assert.matches("not known yet", req.response.json.detail, 1, true)
                assert.are.equal(1, r.index_stats().rebuilds)
                -- sandboxes already in the index keep working meanwhile
                req = send(r, { ["X-Sandbox-ID"] = "py", ["X-Sandbox-Namespace"] = "team-a" })
                assert.are.equal("10.0.0.8", req.forwarded.host)
            end)

        it("spaces rebuilds by index_cost_factor times the last rebuild's duration", function()
            local r = load{ guess_users = {}, index_min_interval = 0,
                index_cost_factor = 1e9 }
            assert.are.equal(404, send(r, { ["X-Sandbox-ID"] = "late" }).response.status)
            local st = r.index_stats()
            assert.are.equal(1, st.rebuilds)
            assert.is_true(st.last_cost > 0)
            assert.are.equal(st.last_cost * 1e9, st.wait)
            routes.set("dave/late", { namespace = "default", name = "late", user = "dave",
                address = "10.3.0.1", port = 8888, ready = true })
            assert.are.equal(503, send(r, { ["X-Sandbox-ID"] = "late" }).response.status)
            assert.are.equal(1, r.index_stats().rebuilds)
        end)

        it("rebuilds at once after a change when both spacing knobs are 0", function()
            local r = load{ guess_users = {}, index_min_interval = 0,
                index_cost_factor = 0 }
            for i = 1, 5 do
                routes.set("dave/n" .. i, { namespace = "default", name = "n" .. i, user = "dave",
                    address = "10.4.0." .. i, port = 8888, ready = true })
                local req = send(r, { ["X-Sandbox-ID"] = "n" .. i })
                assert.are.equal("10.4.0." .. i, req.forwarded.host)
            end
            assert.are.equal(5, r.index_stats().rebuilds)
            assert.are.equal(0, r.index_stats().wait)
        end)

        it("rejects bad index settings at load", function()
            assert.has_error(function() load{ index_min_interval = -1 } end)
            assert.has_error(function() load{ index_cost_factor = -1 } end)
            assert.has_error(function() load{ index_cost_factor = "10" } end)
            assert.has_error(function() load{ guess_users = "default" } end)
        end)

        it("a guess still answers inside the rebuild interval", function()
            local r = load{ index_min_interval = 3600 }
            assert.are.equal(404, send(r, { ["X-Sandbox-ID"] = "fresh" }).response.status)
            routes.set("default/fresh", { namespace = "default", name = "fresh", user = "default",
                address = "10.3.0.2", port = 8888, ready = true })
            local req = send(r, { ["X-Sandbox-ID"] = "fresh" })
            assert.are.equal("10.3.0.2", req.forwarded.host)
        end)
    end)

    describe("with auth.lua enabled", function()
        local auth = require "auth"
        local saved

        before_each(function()
            saved = auth.enabled
            auth.enabled = true
        end)

        after_each(function()
            auth.enabled = saved
        end)

        local function as(r, identity, headers)
            local req = testkit.request{ target = "/execute", headers = headers }
            req.ctx.identity = identity
            r.handle(req)
            return req
        end

        it("uses the scripts' auth module", function()
            assert.are.equal(auth, router.auth)
        end)

        it("lets the owner through", function()
            local req = as(router, { user = "alice" },
                { ["X-Sandbox-ID"] = "py", ["X-Sandbox-Namespace"] = "team-a" })
            assert.are.equal("10.0.0.8", req.forwarded.host)
        end)

        it("lets an admin through", function()
            local req = as(router, { user = "ops", admin = true },
                { ["X-Sandbox-ID"] = "py", ["X-Sandbox-Namespace"] = "team-a" })
            assert.are.equal("10.0.0.8", req.forwarded.host)
        end)

        it("answers another user's sandbox like an unknown one (404)", function()
            local req = as(router, { user = "bob" },
                { ["X-Sandbox-ID"] = "py", ["X-Sandbox-Namespace"] = "team-a" })
            assert.are.equal(404, req.response.status)
            assert.are.same({ detail = "Sandbox 'py' not found in namespace 'team-a' (or not yours)." },
                req.response.json)
            assert.is_nil(req.forwarded)
        end)

        it("does not reveal the state of another user's sandbox", function()
            local req = as(router, { user = "bob" }, { ["X-Sandbox-ID"] = "sleepy" })
            assert.are.equal(404, req.response.status)
        end)

        it("fails closed without an identity", function()
            local req = as(router, nil, { ["X-Sandbox-ID"] = "sb" })
            assert.are.equal(404, req.response.status)
        end)

        it("accepts any port by default, but only on the owner's own sandbox address", function()
            -- the documented default (no allowed_ports): the port picks a listener inside the
            -- caller's own sandbox; the owner check comes first and answers 404 whatever the port
            local headers = { ["X-Sandbox-ID"] = "py", ["X-Sandbox-Namespace"] = "team-a",
                ["X-Sandbox-Port"] = "22" }
            local req = as(router, { user = "alice" }, headers)
            assert.are.equal("10.0.0.8", req.forwarded.host)
            assert.are.equal(22, req.forwarded.port)
            for _, p in ipairs({ "22", "9000", "15000" }) do
                headers["X-Sandbox-Port"] = p
                req = as(router, { user = "bob" }, headers)
                assert.are.equal(404, req.response.status, p)
                assert.is_nil(req.forwarded, p)
            end
            local limited = load{ allowed_ports = { 9000 } }
            headers["X-Sandbox-Port"] = "22"
            req = as(limited, { user = "alice" }, headers)
            assert.are.equal(403, req.response.status)
            assert.is_nil(req.forwarded)
        end)

        it("keeps unowned (SDK-created, no user label) sandboxes for admins", function()
            routes.set("default/pool", { namespace = "default", name = "pool",
                address = "10.3.0.9", port = 8888, ready = true }) -- no user: unowned
            local headers = { ["X-Sandbox-ID"] = "pool" }
            local req = as(router, { user = "default" }, headers)
            assert.are.equal(404, req.response.status)
            assert.is_nil(req.forwarded)
            assert.are.equal(404, as(router, { user = "alice" }, headers).response.status)
            req = as(router, { user = "ops", admin = true }, headers)
            assert.are.equal("10.3.0.9", req.forwarded.host)
            -- a sandbox labelled user=default is that user's
            assert.are.equal("10.0.0.7", as(router, { user = "default" },
                { ["X-Sandbox-ID"] = "sb" }).forwarded.host)
        end)

        it("checks nothing when auth is disabled", function()
            auth.enabled = false
            local req = as(router, nil, { ["X-Sandbox-ID"] = "py", ["X-Sandbox-Namespace"] = "team-a" })
            assert.are.equal("10.0.0.8", req.forwarded.host)
        end)
    end)

    describe("router.lua", function()
        local path_router = require "router"

        it("routes by the headers when X-Sandbox-ID is present; the path goes untouched", function()
            local req = send(path_router, { ["X-Sandbox-ID"] = "sb" }, { target = "/alice/py/x?q=1" })
            assert.are.equal("10.0.0.7", req.forwarded.host)
            assert.are.equal(8888, req.forwarded.port)
            assert.are.equal("/alice/py/x?q=1", req.forwarded.path)
            assert.are.equal("default/sb", req.ctx.route.key)
        end)

        it("answers a bad X-Sandbox-ID with 400 even when the path names a sandbox", function()
            for _, id in ipairs({ "", "Bad" }) do
                local req = send(path_router, { ["X-Sandbox-ID"] = id }, { target = "/alice/py/x" })
                assert.are.equal(400, req.response.status, id)
                assert.is_string(req.response.json.detail, id)
            end
        end)

        it("routes by the path without X-Sandbox-ID, with its own errors", function()
            local req = send(path_router, {}, { target = "/alice/py/files?x=1" })
            assert.are.equal("10.0.0.8", req.forwarded.host)
            assert.are.equal(9000, req.forwarded.port)
            assert.are.equal("/files?x=1", req.forwarded.path)
            assert.are.same({}, req.forwarded.removed_headers)
            req = send(path_router, {}, { target = "/alice/ghost/x" })
            assert.are.same({ error = "sandbox not found", path = "alice/ghost" }, req.response.json)
        end)
    end)
end)
