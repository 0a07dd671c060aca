-- Browser apps through the real binary and fixture sandboxes: the response prefix the runtime
-- restores in strip mode (Location, Set-Cookie Path; req:set_response_prefix in C), keep mode,
-- the rewrite knob, a second port of a sandbox by path and by host while its first port
-- answers, a port not allowed never dialled, a sandbox host never reaching the proxy's own
-- endpoints, and browser authentication end to end (query credential -> cookie -> 302, the
-- cookie removed before the sandbox, the Origin check on a WebSocket, nothing of the
-- credential in the access log).
local H = require "spec.helpers.proxy"
local ws = require "spec.helpers.ws"
local net = require "spec.helpers.net"
local crypto = require "sp.crypto"
local cjson = require "cjson"

local BASE = "sbx.test"

local function sandbox(user, name, port, annotations)
    local s = H.sandbox(user, name, port, { namespace = user })
    for k, v in pairs(annotations or {}) do
        s.metadata.annotations[k] = v
    end
    return s
end

local function escape(s)
    return (s:gsub("[^%w%-_.~]", function(c) return ("%%%02X"):format(c:byte()) end))
end

local function header_values(resp, name)
    local out = {}
    for _, h in ipairs(resp.header_list) do
        if h[1]:lower() == name then
            out[#out + 1] = h[2]
        end
    end
    return out
end

describe("browser apps (fixture sandboxes)", function()
    local runtime, dev, spare, px, keys_dir

    setup(function()
        runtime = H.upstream{ name = "runtime" } -- the sandbox's own port ("8888")
        dev = H.upstream{ name = "dev" }         -- a dev server on a second port
        spare = H.upstream{ name = "spare" }     -- a port nobody allowed
        keys_dir = H.tmpdir()
        local f = assert(io.open(keys_dir .. "/keys.json", "wb"))
        f:write(cjson.encode({ keys = {
            { user = "alice", sha256 = crypto.hex(crypto.sha256("alice-key")) },
            { user = "bob", sha256 = crypto.hex(crypto.sha256("bob-key")) } } }))
        f:close()
        px = H.start{
            sandboxes = {
                sandbox("alice", "sb", runtime.port, { ["sandbox-proxy.dev/ports"] = tostring(dev.port) }),
                sandbox("alice", "kept", runtime.port, { ["sandbox-proxy.dev/prefix"] = "keep" }),
                sandbox("bob", "sb", runtime.port),
            },
            config = ([[return {
                auth = { keys_file = %q },
                sandbox_path = { base_domain = %q },
                browser = { cookie_secure = false },
                access_log = { query = true },
                access_log_flush = 0.05,
            }]]):format(keys_dir .. "/keys.json", BASE),
        }
    end)

    teardown(function()
        H.stop_all()
    end)

    local AUTH = { Authorization = "Bearer alice-key" }

    local function get(path, headers)
        local h = { Authorization = AUTH.Authorization }
        for k, v in pairs(headers or {}) do
            h[k] = v
        end
        return assert(px:request{ path = path, headers = h })
    end

    describe("strip mode restores the prefix in response headers", function()
        it("puts a path-absolute Location back under the prefix", function()
            local r = get("/alice/sb/status/302?location=" .. escape("/tree?x=1"))
            assert.are.equal(302, r.status)
            assert.are.equal("/alice/sb/tree?x=1", r.headers["location"])
            r = get("/alice/sb:" .. dev.port .. "/status/301?location=/")
            assert.are.equal("/alice/sb:" .. dev.port .. "/", r.headers["location"])
        end)

        it("rewrites an absolute URL on the request's own Host only", function()
            local own = "http://127.0.0.1:" .. px.port
            local r = get("/alice/sb/status/302?location=" .. escape(own .. "/login?next=%2F"))
            assert.are.equal(own .. "/alice/sb/login?next=%2F", r.headers["location"])
            r = get("/alice/sb/status/302?location=" .. escape(own))
            assert.are.equal(own .. "/alice/sb/", r.headers["location"])
            for _, loc in ipairs({ "http://elsewhere.test/tree", "//evil.test/x", "tree", "../up",
                "/alice/sb/already", "/alice/sb", "https://127.0.0.1:1/x" }) do
                r = get("/alice/sb/status/302?location=" .. escape(loc))
                assert.are.equal(loc, r.headers["location"], loc)
            end
        end)

        it("puts Set-Cookie Path under the prefix, every cookie, nothing else", function()
            local r = get("/alice/sb/status/200?cookie=" .. escape("a=1; Path=/; HttpOnly")
                .. "&cookie=" .. escape("b=2;path = /api/x ;Secure") .. "&cookie=" .. escape("c=3")
                .. "&cookie=" .. escape("d=4; Path=/alice/sb/y") .. "&cookie=" .. escape("e=/x; Domain=h"))
            assert.are.same({ "a=1; Path=/alice/sb; HttpOnly", "b=2;path = /alice/sb/api/x ;Secure",
                "c=3", "d=4; Path=/alice/sb/y", "e=/x; Domain=h" }, header_values(r, "set-cookie"))
        end)

        it("sends X-Forwarded-Prefix and the rest of the path; never a client's prefix", function()
            local e = cjson.decode(get("/alice/sb/echo/x?q=1", { ["X-Forwarded-Prefix"] = "/evil" }).body)
            assert.are.equal("/echo/x?q=1", e.target)
            local prefixes = {}
            for _, h in ipairs(e.headers) do
                if h[1]:lower() == "x-forwarded-prefix" then
                    prefixes[#prefixes + 1] = h[2]
                end
            end
            assert.are.same({ "/alice/sb" }, prefixes)
        end)

        it("keep mode (annotation): the whole target", function()
            -- the fixture routes by path: /alice/kept/echo is its 404; its log has the target
            assert.are.equal(404, get("/alice/kept/echo?k=1").status)
            net.wait_until(function()
                return (runtime.proc:read_stderr() or ""):find("GET /alice/kept/echo?k=1 -> 404", 1, true)
            end, 10, 0.02, "the fixture's log line")
        end)
    end)

    describe("ports", function()
        it("reaches a second port by path and by host while the first answers", function()
            local e = cjson.decode(get("/alice/sb:" .. dev.port .. "/echo/a").body)
            assert.are.same({ "dev", "/echo/a" }, { e.name, e.target })
            e = cjson.decode(get("/alice/sb/echo/a").body)
            assert.are.same({ "runtime", "/echo/a" }, { e.name, e.target })
            e = cjson.decode(get("/echo/b", { Host = dev.port .. "-sb--alice." .. BASE }).body)
            assert.are.same({ "dev", "/echo/b" }, { e.name, e.target })
            e = cjson.decode(get("/echo/c", { Host = "sb--alice." .. BASE .. ":" .. px.port }).body)
            assert.are.same({ "runtime", "/echo/c" }, { e.name, e.target })
        end)

        it("refuses a port not allowed, by path and by host, without dialling it", function()
            local before = spare.stats().connections
            local r = get("/alice/sb:" .. spare.port .. "/echo")
            assert.are.equal(403, r.status)
            local body = cjson.decode(r.body)
            assert.are.equal("port not allowed", body.error)
            local want = { runtime.port, dev.port }
            table.sort(want)
            assert.are.same(want, body.allowed)
            assert.are.equal(403, get("/echo", { Host = spare.port .. "-sb--alice." .. BASE }).status)
            -- one connection more: the stats request itself
            assert.are.equal(before + 1, spare.stats().connections)
        end)

        it("keeps the proxy's endpoints off a sandbox's host", function()
            local r = get("/health", { Host = "sb--alice." .. BASE })
            assert.are.equal(404, r.status) -- the fixture's 404, not the proxy's /health
            assert.are.equal("runtime", r.headers["x-upstream-name"])
            r = get("/health", { Host = BASE })
            assert.are.equal(200, r.status)
            assert.is_nil(r.headers["x-upstream-name"])
        end)

        it("checks the owner on a sandbox host too", function()
            local r = get("/echo", { Host = "sb--bob." .. BASE })
            assert.are.equal(403, r.status)
        end)
    end)

    describe("browser authentication", function()
        it("turns the query credential into a cookie and redirects without it", function()
            local r = assert(px:request{ path = "/alice/sb/tree?a=1&sp_token=alice-key" })
            assert.are.equal(302, r.status)
            assert.are.equal("/alice/sb/tree?a=1", r.headers["location"])
            assert.are.equal("sp_token=alice-key; Path=/alice/sb; HttpOnly; SameSite=Lax",
                r.headers["set-cookie"])
            assert.are.equal("no-store", r.headers["cache-control"])
            local h = assert(px:request{ path = "/tree?sp_token=alice-key",
                headers = { Host = "sb--alice." .. BASE } })
            assert.are.equal("sp_token=alice-key; Path=/; HttpOnly; SameSite=Lax", h.headers["set-cookie"])
            assert.are.equal(401, assert(px:request{ path = "/alice/sb/?sp_token=nope" }).status)
            assert.are.equal(403, assert(px:request{ path = "/bob/sb/?sp_token=alice-key" }).status)
        end)

        it("takes the cookie, removes it before the sandbox, keeps the sandbox's cookies", function()
            local r = assert(px:request{ path = "/alice/sb/echo",
                headers = { Cookie = "_xsrf=abc; sp_token=alice-key; theme=dark" } })
            assert.are.equal(200, r.status)
            local e = cjson.decode(r.body)
            local cookies = {}
            for _, h in ipairs(e.headers) do
                if h[1]:lower() == "cookie" then
                    cookies[#cookies + 1] = h[2]
                end
                assert.is_nil(h[2]:find("alice-key", 1, true), h[1])
            end
            assert.are.same({ "_xsrf=abc; theme=dark" }, cookies)
        end)

        it("reads and cleans every Cookie header (HTTP/2 clients send one per cookie)", function()
            local r = assert(px:request{ path = "/alice/sb/echo", headers = {
                { "Cookie", "a=1" }, { "Cookie", "sp_token=alice-key" }, { "Cookie", "b=2" } } })
            assert.are.equal(200, r.status)
            local cookies = {}
            for _, h in ipairs(cjson.decode(r.body).headers) do
                if h[1]:lower() == "cookie" then
                    cookies[#cookies + 1] = h[2]
                end
            end
            assert.are.same({ "a=1; b=2" }, cookies)
        end)

        it("opens a WebSocket with the cookie and a same-host Origin, refuses another Origin", function()
            local host = "127.0.0.1:" .. px.port
            local c = assert(ws.connect{ port = px.port, path = "/alice/sb/ws",
                origin = "http://" .. host, headers = { Cookie = "sp_token=alice-key" } })
            assert(c:send_text("hi"))
            local op, msg = c:receive(5)
            assert.are.same({ "text", "hi" }, { op, msg })
            c:close()
            local bad, err, resp = ws.connect{ port = px.port, path = "/alice/sb/ws",
                origin = "http://evil.test", headers = { Cookie = "sp_token=alice-key" } }
            if bad then
                bad:close()
            end
            assert.is_nil(bad, err)
            assert.are.equal(403, resp.status)
            -- by host: the Origin is the sandbox's own host
            local shost = "sb--alice." .. BASE
            c = assert(ws.connect{ port = px.port, path = "/ws", origin = "http://" .. shost,
                headers = { Cookie = "sp_token=alice-key", Host = shost } })
            c:close()
        end)

        it("keeps the credential out of the access log (query logging on)", function()
            assert.are.equal(302, assert(px:request{ path = "/alice/sb/?x=1&sp_token=alice-key" }).status)
            assert.are.equal(200, get("/alice/sb/echo?visible=1").status)
            px:wait_log(function(l) return l.query == "visible=1" end, 10, "stdout")
            for _, stream in ipairs({ "stdout", "stderr" }) do
                local text = stream == "stdout" and px:stdout() or px:stderr()
                assert.is_nil(text:find("alice-key", 1, true), stream)
            end
        end)
    end)
end)

-- The rewrite knob, on its own proxy.
describe("browser apps: router.rewrite_response_headers = false", function()
    teardown(function() H.stop_all() end)

    it("relays Location and Set-Cookie as the sandbox sent them", function()
        local up = H.upstream{ name = "plain" }
        local px = H.start{ sandboxes = { H.sandbox("alice", "sb", up.port) },
            config = "return { router = { rewrite_response_headers = false } }" }
        local r = assert(px:request{ path = "/alice/sb/status/302?location=/tree&cookie=" .. escape("a=1; Path=/") })
        assert.are.equal("/tree", r.headers["location"])
        assert.are.equal("a=1; Path=/", r.headers["set-cookie"])
    end)
end)
